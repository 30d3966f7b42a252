# One instance of the app on this machine, deployed from the local image (a tarball built by
# examples/app/packer). The offline twin of examples/stacks/aws: an image change replaces the instance.
#
# Terraform 1.0.3 with only the null provider: no `local` provider and no terraform_data, so the instance is
# a null_resource whose provisioners unpack, start and stop it.
terraform {
  required_version = "~> 1.0.0"
  required_providers {
    null = {
      source  = "hashicorp/null"
      version = "2.1.2"
    }
  }
}

variable "artifact_id" {
  type        = string
  description = "The image to run: absolute path of the tarball the Packer build wrote."
}

variable "artifact_version" {
  type        = string
  description = "The image's version; part of the instance directory and the Consul service ID."
}

variable "namespace" {
  type        = string
  description = "The artifact namespace (e.g. acmeinc/web); recorded for operators, baked into the image."
}

variable "service_name" {
  type        = string
  default     = "web"
  description = "The Consul service name baked into the image."
}

variable "consul_addr" {
  type        = string
  default     = "http://127.0.0.1:8500"
  description = "The Consul agent's HTTP API."
}

variable "deploy_run_id" {
  type        = string
  default     = "manual"
  description = "The Prefect flow run that deploys; put into the service's Meta. Not a trigger, on purpose."
}

variable "workspace" {
  type        = string
  default     = ""
  description = "The workspace deploying; part of the Consul service ID, so workspaces sharing an agent never clash."
}

variable "instance_root" {
  type        = string
  description = "The directory instances are unpacked under."
}

locals {
  service_id   = var.workspace == "" ? "${var.service_name}-${var.artifact_version}" : "${var.service_name}-${var.workspace}-${var.artifact_version}"
  instance_dir = abspath("${var.instance_root}/${var.service_name}-${var.artifact_version}")
  # Provisioners run with an environment built here and nothing else: `env -i` drops whatever Terraform
  # holds (the state backend's credentials above all), so neither the instance nor anything it starts can
  # read them. Values are env's arguments (data), never part of the shell command (code).
  clean_env = ["/usr/bin/env", "-i", "PATH=/usr/local/bin:/usr/bin:/bin", "HOME=/nonexistent", "LANG=C.UTF-8"]
}

resource "null_resource" "instance" {
  # Everything here forces a replacement when it changes, and is everything the destroy provisioner may
  # use (destroy-time provisioners can only read self). deploy_run_id is deliberately absent: it changes
  # every run and would replace a healthy instance each time.
  triggers = {
    artifact_id      = var.artifact_id
    artifact_version = var.artifact_version
    service_id       = local.service_id
    namespace        = var.namespace
    service_name     = var.service_name
    consul_addr      = var.consul_addr
    instance_dir     = local.instance_dir
  }

  # Zero downtime: the replacement starts and registers before the old instance stops. Each instance picks
  # its own free port and has its own directory and service ID (both carry the version), so the two never
  # clash while they overlap. Terraform does NOT run destroy provisioners for the deposed object of a
  # create_before_destroy replacement (hashicorp/terraform#13549, documented by #28345), so the create step
  # below retires its predecessors itself; the destroy provisioner still runs on `terraform destroy`.
  lifecycle {
    create_before_destroy = true
  }

  # Unpack into a fresh directory, then start. Refuses to overwrite a live instance of the same version
  # (e.g. the same version from another artifact path): bump the version instead. The .owner file holds
  # this resource's id, so a destroy step only ever stops the instance its own object started.
  provisioner "local-exec" {
    command = <<-EOT
      set -eu
      dir="$INSTANCE_DIR"
      if [ -f "$dir/app.pid" ] && kill -0 "$(cat "$dir/app.pid")" 2>/dev/null; then
        echo "an instance is already running in $dir; deploy a new version instead" >&2
        exit 1
      fi
      rm -rf "$dir.unpacking" && mkdir -p "$dir.unpacking"
      tar -xzf "$ARTIFACT" -C "$dir.unpacking"
      printf '%s\n' "$OWNER" > "$dir.unpacking/.owner"
      printf '%s\n' "$SERVICE_NAME" > "$dir.unpacking/.service_name"
      rm -rf "$dir" && mv "$dir.unpacking" "$dir"
      # bin/start detaches the app (its own session, output to app.log): nothing keeps Terraform's pipes.
      "$dir/bin/start" --instance-dir "$dir" --consul-addr "$CONSUL_ADDR" --deploy-run-id "$DEPLOY_RUN_ID" \
        --service-id "$SERVICE_ID" --meta "workspace=$WORKSPACE" --port 0
      # Now that the new instance is registered, retire the older ones of this service. A failure to stop
      # one is reported but does not fail the deploy: bin/stop kills the process even when Consul refused
      # the deregistration, so its health check goes critical instead of lingering as passing.
      for old in "$INSTANCE_ROOT"/*; do
        case "$old" in "$dir" | *.unpacking) continue ;; esac
        [ "$(cat "$old/.service_name" 2>/dev/null || true)" = "$SERVICE_NAME" ] || continue
        if "$old/bin/stop" --instance-dir "$old"; then  # deregisters where that instance registered
          rm -rf "$old"
        else
          echo "WARNING: could not cleanly retire $old; see the message above" >&2
        fi
      done
    EOT
    interpreter = concat(local.clean_env, [
      "INSTANCE_DIR=${local.instance_dir}",
      "ARTIFACT=${var.artifact_id}",
      "CONSUL_ADDR=${var.consul_addr}",
      "DEPLOY_RUN_ID=${var.deploy_run_id}",
      "OWNER=${self.id}",
      "SERVICE_NAME=${var.service_name}",
      "SERVICE_ID=${local.service_id}",
      "WORKSPACE=${var.workspace}",
      "INSTANCE_ROOT=${abspath(var.instance_root)}",
      "/bin/sh", "-c",
    ])
  }

  # Deregister from Consul, stop the process group, remove the directory. bin/stop is idempotent, and a
  # directory that is gone (or was taken over, see .owner) means there is nothing of ours left to stop.
  provisioner "local-exec" {
    when    = destroy
    command = <<-EOT
      set -eu
      dir="$INSTANCE_DIR"
      if [ "$(cat "$dir/.owner" 2>/dev/null || true)" != "$OWNER" ]; then
        echo "$dir is gone or belongs to a newer instance; nothing of ours to stop"
        exit 0
      fi
      "$dir/bin/stop" --instance-dir "$dir" --consul-addr "$CONSUL_ADDR"
      rm -rf "$dir"
    EOT
    # Destroy-time provisioners may only read self, so the clean environment is spelled out here.
    interpreter = [
      "/usr/bin/env", "-i", "PATH=/usr/local/bin:/usr/bin:/bin", "HOME=/nonexistent", "LANG=C.UTF-8",
      "INSTANCE_DIR=${self.triggers.instance_dir}",
      "CONSUL_ADDR=${self.triggers.consul_addr}",
      "OWNER=${self.id}",
      "/bin/sh", "-c",
    ]
  }
}

output "service_id" {
  description = "The Consul service ID the instance registered."
  value       = null_resource.instance.triggers.service_id
}

output "instance_dir" {
  value = null_resource.instance.triggers.instance_dir
}

output "artifact_version" {
  value = null_resource.instance.triggers.artifact_version
}

# Whether the instance's files are still where it was unpacked. Outputs are evaluated again by every plan, a
# refresh-only one included, so the drift check sees files removed behind Terraform's back as this output
# leaving its state (the null provider itself reads nothing back). The path takes the resource's id (as ""),
# so that Terraform evaluates it after the create step, not at plan time, before the files exist.
output "instance_present" {
  description = "The instance's files are in place (the .owner file its create step writes exists)."
  value       = fileexists("${null_resource.instance.triggers.instance_dir}/.owner${replace(null_resource.instance.id, "/.*/", "")}")
}
