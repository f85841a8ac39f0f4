terraform {
  required_version = ">= 1.5.0"

  required_providers {
    digitalocean = {
      source  = "digitalocean/digitalocean"
      version = "~> 2.40"
    }
  }
}

# Token from DIGITALOCEAN_TOKEN (or DIGITALOCEAN_ACCESS_TOKEN); never in a file here.
provider "digitalocean" {}
