# The fleet on DigitalOcean: one VPC per region, tags per campaign/role/role-region, firewalls
# attached by tag, and one droplet per node whose user_data comes from modules/cloud-init (the same
# module ./render calls, so CI and the lab render exactly these bytes).

locals {
  # Each region's VPC range is fleet data (fleet.toml `[regions.X] vpc_cidr`, passed by
  # `seeder tfvars` as region_cidrs): the seeder certifies a node's private address only inside its
  # region's range, so both read the one value. A region without a range is an error here.
  regions     = module.fleet.regions
  region_cidr = { for r in local.regions : r => var.region_cidrs[r] }

  roles        = toset([for n in values(var.nodes) : n.role])
  role_regions = toset([for n in values(var.nodes) : "${n.role}-${n.region}"])

  # Regions where peers talk to a pg: the only places 5432 is open, and only from that region's peers.
  pg_regions = toset([
    for r in local.regions : r
    if contains(local.role_regions, "pg-${r}") && contains(local.role_regions, "peer-${r}")
  ])

  # Who may reach the federation port: every fleet member that speaks to peers.
  peer_port_source_roles = [for r in ["peer", "agent", "ctrl"] : r if contains(local.roles, r)]
}

# Validates the fleet's rules (see modules/fleet/variables.tf for why not in variables.tf).
module "fleet" {
  source = "./modules/fleet"
  nodes  = { for name, n in var.nodes : name => { role = n.role, region = n.region, size = n.size } }
}

module "cloud_init" {
  source   = "./modules/cloud-init"
  for_each = var.nodes

  node             = each.key
  role             = each.value.role
  region           = each.value.region
  campaign         = var.campaign
  seeder_url       = var.seeder_url
  join_url         = sensitive(each.value.join_url)
  campaign_ca_pem  = var.campaign_ca_pem
  manifest_key_pem = var.manifest_key_pem
  bootstrap_url    = var.bootstrap_url
  bootstrap_sha256 = var.bootstrap_sha256
}

resource "digitalocean_vpc" "regional" {
  for_each = local.region_cidr

  name     = "${var.campaign}-vpc-${each.key}"
  region   = each.key
  ip_range = each.value
}

# Tags are resources so firewalls never reference a tag before it exists.
resource "digitalocean_tag" "campaign" {
  name = var.campaign
}

resource "digitalocean_tag" "role" {
  for_each = local.roles

  name = "${var.campaign}-${each.key}"
}

resource "digitalocean_tag" "role_region" {
  for_each = local.role_regions

  name = "${var.campaign}-${each.key}"
}

resource "digitalocean_droplet" "node" {
  for_each = var.nodes

  name     = each.key
  region   = each.value.region
  size     = each.value.size
  image    = var.image
  vpc_uuid = digitalocean_vpc.regional[each.value.region].id
  ssh_keys = [var.ssh_key_fingerprint]
  tags = [
    digitalocean_tag.campaign.name,
    digitalocean_tag.role[each.value.role].name,
    digitalocean_tag.role_region["${each.value.role}-${each.value.region}"].name,
  ]
  user_data = module.cloud_init[each.key].user_data

  lifecycle {
    # A changed user_data makes DigitalOcean replace the droplet. Refreshing join tokens (a new
    # `seeder tfvars`) must never do that to a running node; a node is replaced, with a fresh token,
    # only on purpose: terraform apply -replace='digitalocean_droplet.node["<name>"]'.
    ignore_changes = [user_data]
  }
}

# Every node: SSH from admin CIDRs only (closed when there are none), ICMP within the fleet,
# all outbound. Being in any firewall makes DigitalOcean drop all other inbound traffic.
resource "digitalocean_firewall" "campaign" {
  name = "${var.campaign}-base"
  tags = [digitalocean_tag.campaign.name]

  dynamic "inbound_rule" {
    for_each = length(var.admin_source_cidrs) > 0 ? [22] : []
    content {
      protocol         = "tcp"
      port_range       = tostring(inbound_rule.value)
      source_addresses = var.admin_source_cidrs
    }
  }

  inbound_rule {
    protocol    = "icmp"
    source_tags = [digitalocean_tag.campaign.name]
  }

  outbound_rule {
    protocol              = "tcp"
    port_range            = "1-65535"
    destination_addresses = ["0.0.0.0/0", "::/0"]
  }

  outbound_rule {
    protocol              = "udp"
    port_range            = "1-65535"
    destination_addresses = ["0.0.0.0/0", "::/0"]
  }

  outbound_rule {
    protocol              = "icmp"
    destination_addresses = ["0.0.0.0/0", "::/0"]
  }
}

# Peers: the federation port from peer/agent/ctrl nodes (by tag) and the admin CIDRs only.
resource "digitalocean_firewall" "peer" {
  for_each = contains(local.roles, "peer") ? toset(["peer"]) : toset([])

  name = "${var.campaign}-peer"
  tags = [digitalocean_tag.role["peer"].name]

  inbound_rule {
    protocol         = "tcp"
    port_range       = tostring(var.federation_port)
    source_tags      = [for r in local.peer_port_source_roles : digitalocean_tag.role[r].name]
    source_addresses = var.admin_source_cidrs
  }
}

# Each region's pg: PostgreSQL from that region's peers only.
resource "digitalocean_firewall" "pg" {
  for_each = local.pg_regions

  name = "${var.campaign}-pg-${each.key}"
  tags = [digitalocean_tag.role_region["pg-${each.key}"].name]

  inbound_rule {
    protocol    = "tcp"
    port_range  = tostring(var.pg_port)
    source_tags = [digitalocean_tag.role_region["peer-${each.key}"].name]
  }
}
