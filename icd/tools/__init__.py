"""The Packer and Terraform adapters (terraform-exec style) and the one subprocess chokepoint."""
