# One node's inputs. The root module and ../../render call this module with identical arguments, so
# what CI and the lab render is byte-for-byte what a droplet receives.
#
# Per-value checks live here so both callers get them; fleet-wide checks (one pg per region, ...) live
# on the callers' `nodes` variable; checks that relate two inputs are preconditions in outputs.tf
# (variable validations may only refer to their own variable before Terraform 1.9).

variable "node" {
  description = "Node name: hostname, certificate CN, droplet name (<campaign>-<role>-<region>-<NN>)."
  type        = string
  nullable    = false

  validation {
    condition     = can(regex("^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", var.node))
    error_message = "node must be a DNS label: 1-63 of [a-z0-9-], starting and ending alphanumeric."
  }
}

variable "role" {
  description = "The node's role: pg, peer, agent or ctrl."
  type        = string
  nullable    = false

  validation {
    condition     = contains(["pg", "peer", "agent", "ctrl"], var.role)
    error_message = "role must be one of pg, peer, agent, ctrl."
  }
}

variable "region" {
  description = "DigitalOcean region slug, e.g. nyc3."
  type        = string
  nullable    = false

  validation {
    condition     = can(regex("^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", var.region))
    error_message = "region must be a DNS label, e.g. nyc3."
  }
}

variable "campaign" {
  description = "Campaign name, e.g. do-1461."
  type        = string
  nullable    = false

  validation {
    condition     = can(regex("^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", var.campaign))
    error_message = "campaign must be a DNS label, e.g. do-1461."
  }
}

variable "seeder_url" {
  description = "https://host:port of the seeder, no path."
  type        = string
  nullable    = false

  validation {
    condition     = can(regex("^https://[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[0-9]{1,5})?$", var.seeder_url))
    error_message = "seeder_url must be https://host[:port] with a lowercase host and no path."
  }
}

variable "join_url" {
  description = "The node's signed join URL; carries its join token, the one secret in user_data."
  type        = string
  nullable    = false
  sensitive   = true

  # Its exact shape is checked in outputs.tf, where the error can name the node.
  validation {
    condition     = startswith(var.join_url, "https://")
    error_message = "join_url must be an https URL."
  }
}

variable "campaign_ca_pem" {
  description = "The campaign CA certificate (PEM, public): the only root trusted for the seeder."
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
  description = "https URL from which the seeder serves the bootstrap binary."
  type        = string
  nullable    = false

  validation {
    condition     = can(regex("^https://[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[0-9]{1,5})?/[A-Za-z0-9._~/-]*$", var.bootstrap_url))
    error_message = "bootstrap_url must be an https URL with a path of [A-Za-z0-9._~/-] only (no query, no quotes)."
  }
}

variable "bootstrap_sha256" {
  description = "sha256 of the bootstrap binary, 64 lowercase hex."
  type        = string
  nullable    = false

  validation {
    condition     = can(regex("^[0-9a-f]{64}$", var.bootstrap_sha256))
    error_message = "bootstrap_sha256 must be 64 lowercase hex characters."
  }
}
