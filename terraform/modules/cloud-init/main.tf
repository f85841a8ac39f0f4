# Renders one node's #cloud-config. Every interpolated value goes through jsonencode(): a JSON string
# is also a valid YAML double-quoted scalar and a valid TOML basic string, so no input can break out
# of its field. Nothing here depends on time or on a generation: the same inputs give the same bytes.

locals {
  join_toml = templatefile("${path.module}/join.toml.tftpl", {
    seeder_url       = var.seeder_url
    campaign         = var.campaign
    node             = var.node
    role             = var.role
    region           = var.region
    join_url         = var.join_url
    ca_pem           = var.campaign_ca_pem
    manifest_key_pem = var.manifest_key_pem
  })

  fetch_bootstrap = templatefile("${path.module}/fetch-bootstrap.sh.tftpl", {
    # The variable's validation already excludes quotes; quoting for sh anyway costs nothing.
    bootstrap_url_sh = "'${replace(var.bootstrap_url, "'", "'\\''")}'"
    bootstrap_sha256 = var.bootstrap_sha256
  })

  user_data = templatefile("${path.module}/cloud-init.yaml.tftpl", {
    node            = var.node
    join_toml       = local.join_toml
    campaign_ca_pem = var.campaign_ca_pem
    fetch_bootstrap = local.fetch_bootstrap
  })
}
