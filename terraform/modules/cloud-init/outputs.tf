output "user_data" {
  description = "The node's #cloud-config (contains its join token: sensitive)."
  value       = local.user_data
  sensitive   = true

  precondition {
    condition     = can(regex("^${var.campaign}-${var.role}-${var.region}-[0-9]{2}$", var.node))
    error_message = "node ${var.node} must be named <campaign>-<role>-<region>-<NN> (${var.campaign}-${var.role}-${var.region}-NN)."
  }

  precondition {
    condition = (
      startswith(var.join_url, "${var.seeder_url}/v1/join/${var.node}?token=")
      && can(regex("^[A-Za-z0-9._~%=-]+$", trimprefix(var.join_url, "${var.seeder_url}/v1/join/${var.node}?token=")))
    )
    error_message = "node ${var.node}: join_url must be <seeder_url>/v1/join/${var.node}?token=<payload>.<signature> (seeder_url ${var.seeder_url})."
  }

  precondition {
    condition     = startswith(var.bootstrap_url, "${var.seeder_url}/")
    error_message = "bootstrap_url must be served by the seeder (start with ${var.seeder_url}/)."
  }
}
