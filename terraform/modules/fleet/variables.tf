# Fleet-wide rules, checked here rather than on the callers' `nodes` variable: when a root variable's
# validation fails, Terraform quotes its whole value from nodes.auto.tfvars.json, every node's join
# token included. A failure here quotes only the module call and "map of object with N elements".
# The callers therefore pass nodes without join_url; modules/cloud-init checks each join_url (as a
# sensitive value).

variable "nodes" {
  description = "Node name => {role, region, size}: the fleet without its join tokens."
  type = map(object({
    role   = string
    region = string
    size   = string
  }))
  nullable = false

  validation {
    condition     = length(var.nodes) > 0
    error_message = "nodes must not be empty."
  }

  validation {
    condition     = alltrue([for name, n in var.nodes : contains(["pg", "peer", "agent", "ctrl"], n.role)])
    error_message = "every node's role must be one of pg, peer, agent, ctrl."
  }

  validation {
    condition = alltrue([
      for name, n in var.nodes : can(regex("^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", name))
      && can(regex("^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", n.region))
      && can(regex("^[a-z0-9][a-z0-9-]*$", n.size))
    ])
    error_message = "node names and regions must be DNS labels and sizes DigitalOcean size slugs."
  }

  validation {
    condition = alltrue([
      for r in distinct([for n in values(var.nodes) : n.region]) :
      length([for n in values(var.nodes) : n if n.region == r && n.role == "pg"]) <= 1
    ])
    error_message = "at most one pg node per region."
  }

  validation {
    condition = alltrue([
      for r in distinct([for n in values(var.nodes) : n.region if n.role == "peer"]) :
      length([for n in values(var.nodes) : n if n.region == r && n.role == "pg"]) == 1
    ])
    error_message = "every region that has a peer must have exactly one pg node."
  }
}
