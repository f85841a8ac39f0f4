output "fleet" {
  description = "Node name => {role, region, size, public_ip, private_ip}."
  value = {
    for name, d in digitalocean_droplet.node : name => {
      role       = var.nodes[name].role
      region     = d.region
      size       = d.size
      public_ip  = d.ipv4_address
      private_ip = d.ipv4_address_private
    }
  }
}
