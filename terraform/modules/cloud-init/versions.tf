# Provider-less on purpose: CI and the lab can `init` + `apply` this module offline.
terraform {
  required_version = ">= 1.5.0"
}
