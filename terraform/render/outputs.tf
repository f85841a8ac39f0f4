# Both outputs carry join tokens: sensitive, so `terraform apply` does not print them. Read them with
# `terraform output -json`.

output "user_data" {
  description = "Node name => its #cloud-config, byte-for-byte what the droplet receives."
  value       = { for name, m in module.cloud_init : name => m.user_data }
  sensitive   = true
}

output "user_data_decoded" {
  description = "Node name => its #cloud-config parsed as YAML (so tests can assert structure via JSON)."
  value       = { for name, m in module.cloud_init : name => yamldecode(m.user_data) }
  sensitive   = true
}
