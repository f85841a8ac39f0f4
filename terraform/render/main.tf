# Renders every node's user_data without DigitalOcean: the module calls below are identical to those
# in ../main.tf (seeder/tests/terraform_render.rs checks it), so these are the droplets' exact bytes.

module "fleet" {
  source = "../modules/fleet"
  nodes  = { for name, n in var.nodes : name => { role = n.role, region = n.region, size = n.size } }
}

module "cloud_init" {
  source   = "../modules/cloud-init"
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
