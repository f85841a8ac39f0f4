# Provider-less on purpose: CI and the lab `init` + `apply` this root module offline.
terraform {
  required_version = ">= 1.5.0"
}
