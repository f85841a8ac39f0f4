output "regions" {
  description = "The fleet's regions, sorted (a region's index decides its VPC CIDR)."
  value       = sort(distinct([for n in values(var.nodes) : n.region]))
}
