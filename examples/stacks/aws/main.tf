# A fleet of the app on AWS, one instance per slot, from the AMIs built by examples/app/packer
# (source.amazon-ebs.ami_ssh). Slot i runs var.instances[i], so a rollout moves the fleet a few slots at a time
# (docs/service-contract.md#rollout); without var.instances it is one instance of var.artifact_id.
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

variable "instances" {
  type = list(object({
    artifact_id      = string
    artifact_version = string
  }))
  # Null when the deploy passes no fleet (a workspace without a rollout): one instance of artifact_id.
  default     = null
  description = "Slot i runs instances[i]: the AMI (as artifact_id below) and its version. Passed as JSON text."
}

variable "artifact_id" {
  type        = string
  description = "The rollout's target AMI: the Packer manifest's artifact_id (\"us-east-1:ami-...\") or a bare AMI id."
}

variable "artifact_version" {
  type        = string
  description = "The rollout's target version; the fleet's version when instances is null."
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
  instances = var.instances != null ? var.instances : [
    { artifact_id = var.artifact_id, artifact_version = var.artifact_version },
  ]
  # The manifest's artifact_id is "<region>:<ami id>"; accept a bare id too.
  ami_ids = [for slot in local.instances : element(split(":", slot.artifact_id), length(split(":", slot.artifact_id)) - 1)]
  # The ID each instance's agent registers (baked by the Packer build): unique per node, which is where
  # Consul keeps service IDs, not across the fleet; slots of one version share it, and Meta slot tells them apart.
  service_ids = [for slot in local.instances : "${var.service_name}-${slot.artifact_version}"]
}

resource "aws_instance" "app" {
  # One instance per slot, addressed by its index: a slot whose AMI changes is replaced alone, and a shorter
  # list terminates the last slots.
  count = length(local.instances)

  ami                    = local.ami_ids[count.index]
  instance_type          = var.instance_type
  subnet_id              = var.subnet_id
  vpc_security_group_ids = var.security_group_ids
  iam_instance_profile   = var.iam_instance_profile

  # The AMI already holds the app (/opt/<service>) and the baked Consul service definition
  # (/etc/consul.d/<service>.json, written by the Packer build). Boot adds the slot to its Meta (a slot's
  # index never changes, so it replaces nothing), then starts the agent and the app.
  user_data = <<-EOT
    #!/bin/sh
    set -eu
    cat > /etc/consul.d/agent.hcl <<'HCL'
    data_dir   = "/opt/consul"
    retry_join = ["${var.consul_retry_join}"]
    HCL
    /usr/bin/python3 -c 'import json, sys; p = sys.argv[1]; d = json.load(open(p)); d["service"].setdefault("Meta", {})["slot"] = sys.argv[2]; json.dump(d, open(p, "w"), indent=2)' \
      /etc/consul.d/${var.service_name}.json ${count.index}
    systemctl enable --now consul
    cat > /etc/systemd/system/${var.service_name}.service <<'UNIT'
    [Unit]
    Description=${var.namespace} ${local.instances[count.index].artifact_version}
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
    Name          = "${var.service_name}-${count.index}-${local.instances[count.index].artifact_version}"
    namespace     = var.namespace
    version       = local.instances[count.index].artifact_version
    slot          = tostring(count.index)
    deploy_run_id = var.deploy_run_id
  }

  # A new AMI replaces the slot's instance; the replacement boots and joins Consul before the old one goes away.
  lifecycle {
    create_before_destroy = true
    # A re-run with the same artifact must not show a diff only because the run id changed.
    ignore_changes = [tags["deploy_run_id"]]
  }
}

output "service_ids" {
  description = "The Consul service ID each slot's agent registers, in slot order."
  value       = local.service_ids
}

output "instance_ids" {
  value = aws_instance.app[*].id
}

output "private_ips" {
  value = aws_instance.app[*].private_ip
}

output "artifact_versions" {
  value = [for slot in local.instances : slot.artifact_version]
}

# The single-instance outputs, of slot 0, for what reads them (the deploy's health gate, the deploy record,
# icd/deploy/running.py); null for an empty fleet.
output "service_id" {
  value = try(local.service_ids[0], null)
}

output "instance_id" {
  value = try(aws_instance.app[0].id, null)
}

output "private_ip" {
  value = try(aws_instance.app[0].private_ip, null)
}

output "artifact_version" {
  value = try(local.instances[0].artifact_version, null)
}
