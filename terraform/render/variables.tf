# The variables of nodes.auto.tfvars.json, declared exactly as in ../variables.tf (the DigitalOcean-only
# ones left out). seeder/tests/terraform_render.rs fails if a block here differs from its twin there.

variable "campaign" {
  description = "Campaign name, e.g. do-1461: the fleet-wide tag and the prefix of every name."
  type        = string
  nullable    = false

  validation {
    condition     = can(regex("^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", var.campaign))
    error_message = "campaign must be a DNS label, e.g. do-1461."
  }
}

variable "seeder_url" {
  description = "https://host:port where droplets reach the seeder."
  type        = string
  nullable    = false

  validation {
    condition     = can(regex("^https://[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[0-9]{1,5})?$", var.seeder_url))
    error_message = "seeder_url must be https://host[:port] with a lowercase host and no path."
  }
}

variable "campaign_ca_pem" {
  description = "The campaign CA certificate (PEM, public); travels in user_data as the seeder's only trust anchor."
  type        = string
  nullable    = false

  validation {
    condition     = can(regex("^-----BEGIN CERTIFICATE-----\n(?:[A-Za-z0-9+/=]{1,76}\n)+-----END CERTIFICATE-----\n?$", var.campaign_ca_pem))
    error_message = "campaign_ca_pem must be exactly one PEM CERTIFICATE block."
  }
}

variable "manifest_key_pem" {
  description = "The manifest verifying key (SPKI PEM, Ed25519, public)."
  type        = string
  nullable    = false

  validation {
    condition     = can(regex("^-----BEGIN PUBLIC KEY-----\n(?:[A-Za-z0-9+/=]{1,76}\n)+-----END PUBLIC KEY-----\n?$", var.manifest_key_pem))
    error_message = "manifest_key_pem must be exactly one PEM PUBLIC KEY block."
  }
}

variable "bootstrap_url" {
  description = "https URL of the bootstrap binary served by the seeder."
  type        = string
  nullable    = false

  validation {
    condition     = can(regex("^https://[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[0-9]{1,5})?/[A-Za-z0-9._~/-]*$", var.bootstrap_url))
    error_message = "bootstrap_url must be an https URL with a path of [A-Za-z0-9._~/-] only (no query, no quotes)."
  }
}

variable "bootstrap_sha256" {
  description = "sha256 of the bootstrap binary (64 lowercase hex); checked on the droplet before it runs."
  type        = string
  nullable    = false

  validation {
    condition     = can(regex("^[0-9a-f]{64}$", var.bootstrap_sha256))
    error_message = "bootstrap_sha256 must be 64 lowercase hex characters."
  }
}

variable "nodes" {
  description = "Node name => {role, region, size, join_url}, as written by `seeder tfvars`."
  type = map(object({
    role     = string
    region   = string
    size     = string
    join_url = string
  }))
  nullable = false
  # No validation blocks here on purpose: a failing one makes Terraform quote this whole value from
  # the tfvars file, every join token included. modules/fleet checks the fleet's rules (roles, one pg
  # per region, ...) and modules/cloud-init each join_url, without printing a token.
}
