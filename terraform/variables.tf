# Inputs. `seeder tfvars` writes nodes.auto.tfvars.json (campaign, seeder_url, the two public PEMs,
# bootstrap_url/bootstrap_sha256, nodes and region_cidrs); the operator sets ssh_key_fingerprint and, if wanted,
# admin_source_cidrs (e.g. in terraform.tfvars).
#
# The variables shared with ./render are declared identically there (seeder/tests/terraform_render.rs
# checks it). Fleet rules live in modules/fleet and per-node checks in modules/cloud-init; both this
# module and ./render call them with identical arguments.

variable "campaign" {
  description = "Campaign name, e.g. do-1461: the fleet-wide tag and the prefix of every name."
  type        = string
  nullable    = false

  validation {
    condition     = can(regex("^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", var.campaign))
    error_message = "campaign must be a DNS label, e.g. do-1461."
  }
}

variable "region_cidrs" {
  description = "Region => its VPC range (a.b.c.d/p), from fleet.toml via `seeder tfvars`; the seeder certifies private addresses only inside it."
  type        = map(string)
  nullable    = false

  validation {
    condition     = alltrue([for r, c in var.region_cidrs : can(cidrhost(c, 0)) && can(regex("^[0-9.]+/[0-9]+$", c))])
    error_message = "region_cidrs values must be IPv4 CIDRs a.b.c.d/p."
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

# --- DigitalOcean-only inputs (not in nodes.auto.tfvars.json) -------------------------------------

variable "image" {
  description = "Droplet image slug."
  type        = string
  default     = "ubuntu-24-04-x64"
  nullable    = false
}

variable "ssh_key_fingerprint" {
  description = "MD5 fingerprint (or numeric id) of an SSH key registered with DigitalOcean; for break-glass access only."
  type        = string
  nullable    = false

  validation {
    condition     = can(regex("^(([0-9a-f]{2}:){15}[0-9a-f]{2}|[0-9]+)$", var.ssh_key_fingerprint))
    error_message = "ssh_key_fingerprint must be an MD5 fingerprint (aa:bb:...:ff) or a numeric key id."
  }
}

variable "admin_source_cidrs" {
  description = "CIDRs allowed to SSH (22) and to the peer port (e.g. a test harness). Empty closes SSH: nodes are pull-based and need no inbound access to bootstrap."
  type        = list(string)
  default     = []
  nullable    = false

  validation {
    condition     = alltrue([for c in var.admin_source_cidrs : can(cidrhost(c, 0)) && !endswith(c, "/0")])
    error_message = "admin_source_cidrs must be CIDRs narrower than /0 (never 0.0.0.0/0 or ::/0)."
  }
}

variable "federation_port" {
  description = "ai-memory federation (peer) port."
  type        = number
  default     = 9077
  nullable    = false

  validation {
    condition     = var.federation_port == floor(var.federation_port) && var.federation_port >= 1 && var.federation_port <= 65535
    error_message = "federation_port must be a TCP port (1-65535)."
  }
}

variable "pg_port" {
  description = "PostgreSQL port on pg nodes."
  type        = number
  default     = 5432
  nullable    = false

  validation {
    condition     = var.pg_port == floor(var.pg_port) && var.pg_port >= 1 && var.pg_port <= 65535
    error_message = "pg_port must be a TCP port (1-65535)."
  }
}
