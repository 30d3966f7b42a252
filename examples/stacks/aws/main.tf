# One instance of the app on AWS, from the AMI built by examples/app/packer (source.amazon-ebs.ami_ssh).
# Documented, NOT run in this repository: the aws provider cannot be downloaded here. See README.md.
terraform {
  required_version = "~> 1.0.0"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 3.50"
    }
  }
}

variable "artifact_id" {
  type        = string
  description = "The AMI to run: the Packer manifest's artifact_id (\"us-east-1:ami-...\") or a bare AMI id."
}

variable "artifact_version" {
  type = string
}

variable "namespace" {
  type = string
}

variable "service_name" {
  type    = string
  default = "web"
}

variable "deploy_run_id" {
  type        = string
  default     = "manual"
  description = "Recorded in a tag; user_data ignores it, so a new run alone does not replace the instance."
}

# deploy-artifact passes these to every stack (docs/service-contract.md#stack-variables); on AWS the agent
# on the instance registers the service and Terraform keeps no local files, so they are declared, not used.
variable "consul_addr" {
  type        = string
  description = "Unused here: the instance's own Consul agent registers the baked service definition."
}

variable "workspace" {
  type = string
}

variable "instance_root" {
  type        = string
  description = "Unused here: the instance is the unit, not a directory on the worker."
}

variable "aws_region" {
  type    = string
  default = "us-east-1"
}

variable "subnet_id" {
  type = string
}

variable "security_group_ids" {
  type        = list(string)
  description = "Must allow the app port from the load balancer and Consul's gossip ports within the VPC."
}

variable "instance_type" {
  type    = string
  default = "t3.micro"
}

variable "consul_retry_join" {
  type        = string
  default     = "provider=aws tag_key=consul-cluster tag_value=main"
  description = "How the agent finds the Consul servers (cloud auto-join)."
}

variable "iam_instance_profile" {
  type        = string
  description = "Needs ec2:DescribeInstances for Consul's cloud auto-join."
}

provider "aws" {
  region = var.aws_region
}

locals {
  # The manifest's artifact_id is "<region>:<ami id>"; accept a bare id too.
  ami_id     = element(split(":", var.artifact_id), length(split(":", var.artifact_id)) - 1)
  service_id = "${var.service_name}-${var.artifact_version}"
}

resource "aws_instance" "app" {
  ami                    = local.ami_id
  instance_type          = var.instance_type
  subnet_id              = var.subnet_id
  vpc_security_group_ids = var.security_group_ids
  iam_instance_profile   = var.iam_instance_profile

  # The AMI already holds the app (/opt/<service>) and the baked Consul service definition
  # (/etc/consul.d/<service>.json, written by the Packer build). Boot only starts the agent and the app.
  user_data = <<-EOT
    #!/bin/sh
    set -eu
    cat > /etc/consul.d/agent.hcl <<'HCL'
    data_dir   = "/opt/consul"
    retry_join = ["${var.consul_retry_join}"]
    HCL
    systemctl enable --now consul
    cat > /etc/systemd/system/${var.service_name}.service <<'UNIT'
    [Unit]
    Description=${var.namespace} ${var.artifact_version}
    After=network-online.target
    [Service]
    ExecStart=/usr/bin/python3 /opt/${var.service_name}/app/app.py --bind 0.0.0.0 --port 8080 --instance-dir /opt/${var.service_name}
    Restart=on-failure
    [Install]
    WantedBy=multi-user.target
    UNIT
    systemctl daemon-reload
    systemctl enable --now ${var.service_name}
  EOT

  tags = {
    Name          = local.service_id
    namespace     = var.namespace
    version       = var.artifact_version
    deploy_run_id = var.deploy_run_id
  }

  # A new AMI replaces the instance; the replacement boots and joins Consul before the old one goes away.
  lifecycle {
    create_before_destroy = true
    # A re-run with the same artifact must not show a diff only because the run id changed.
    ignore_changes = [tags["deploy_run_id"]]
  }
}

output "service_id" {
  value = local.service_id
}

output "instance_id" {
  value = aws_instance.app.id
}

output "private_ip" {
  value = aws_instance.app.private_ip
}

output "artifact_version" {
  value = var.artifact_version
}
