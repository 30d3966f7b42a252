# A fleet of the app on this machine: one instance per slot, each its own process, port, directory and
# Consul service instance, deployed from local images (tarballs built by examples/app/packer). Slot i runs
# var.instances[i], so a rollout moves the fleet to a new version a few slots at a time
# (docs/service-contract.md#rollout). The fleet twin of examples/stacks/local, which it follows closely.
#
# Terraform 1.0.3 with only the null provider: no `local` provider and no terraform_data, so each instance is
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

variable "instances" {
  type = list(object({
    artifact_id      = string
    artifact_version = string
  }))
  # Null when the deploy passes no fleet (a workspace without a rollout): then the fleet is one instance of
  # artifact_id, so the stack plans like the single-instance one instead of stopping at a missing variable.
  default     = null
  description = "Slot i runs instances[i]: the image's absolute path and its version. Passed as JSON text."
}

variable "artifact_id" {
  type        = string
  description = "The rollout's target image (absolute path of the tarball); the fleet's image when instances is null."
}

variable "artifact_version" {
  type        = string
  description = "The rollout's target version; the fleet's version when instances is null."
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
  description = "The Prefect flow run that deploys; put into the services' Meta. Not a trigger, on purpose."
}

variable "workspace" {
  type        = string
  default     = ""
  description = "The workspace deploying; part of the Consul service IDs, so workspaces sharing an agent never clash."
}

variable "instance_root" {
  type        = string
  description = "The directory instances are unpacked under."
}

locals {
  instances = var.instances != null ? var.instances : [
    { artifact_id = var.artifact_id, artifact_version = var.artifact_version },
  ]
  # The slot is in every name, so two slots on the same version never share an ID or a directory.
  id_prefix = var.workspace == "" ? var.service_name : "${var.service_name}-${var.workspace}"
  # Provisioners run with an environment built here and nothing else: `env -i` drops whatever Terraform
  # holds (the state backend's credentials above all), so neither an instance nor anything it starts can
  # read them. Values are env's arguments (data), never part of the shell command (code).
  clean_env = ["/usr/bin/env", "-i", "PATH=/usr/local/bin:/usr/bin:/bin", "HOME=/nonexistent", "LANG=C.UTF-8"]
}

resource "null_resource" "instance" {
  # One object per slot, addressed by its index: a slot whose version changes is replaced alone, and the
  # others plan no change. Shrinking the list destroys the last slots (their destroy provisioner runs).
  count = length(local.instances)

  # Everything here forces a replacement of this slot when it changes, and is everything the destroy
  # provisioner may use (destroy-time provisioners can only read self). deploy_run_id is deliberately
  # absent: it changes every run and would replace every healthy instance each time.
  triggers = {
    artifact_id      = local.instances[count.index].artifact_id
    artifact_version = local.instances[count.index].artifact_version
    slot             = tostring(count.index)
    service_id       = "${local.id_prefix}-${count.index}-${local.instances[count.index].artifact_version}"
    namespace        = var.namespace
    service_name     = var.service_name
    consul_addr      = var.consul_addr
    instance_dir     = abspath("${var.instance_root}/${var.service_name}-${count.index}-${local.instances[count.index].artifact_version}")
  }

  # Zero downtime per slot: the replacement starts and registers before the slot's old instance stops. Each
  # instance picks its own free port and has its own directory and service ID (both carry the slot and the
  # version), so the two never clash while they overlap. Terraform does NOT run destroy provisioners for the
  # deposed object of a create_before_destroy replacement (hashicorp/terraform#13549, documented by #28345),
  # so the create step below retires its slot's predecessors itself; the destroy provisioner still runs on
  # `terraform destroy` and for the slots a shorter list drops.
  lifecycle {
    create_before_destroy = true
  }

  # Unpack into a fresh directory, then start. Refuses to overwrite a live instance of the same slot and
  # version (e.g. the same version from another artifact path): bump the version instead. The .owner file
  # holds this object's id, so a destroy step only ever stops the instance its own object started; .slot
  # says which slot the instance is, so a replacement retires its own slot's predecessors and nothing else.
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
      printf '%s\n' "$SLOT" > "$dir.unpacking/.slot"
      rm -rf "$dir" && mv "$dir.unpacking" "$dir"
      # bin/start detaches the app (its own session, output to app.log): nothing keeps Terraform's pipes.
      "$dir/bin/start" --instance-dir "$dir" --consul-addr "$CONSUL_ADDR" --deploy-run-id "$DEPLOY_RUN_ID" \
        --service-id "$SERVICE_ID" --meta "workspace=$WORKSPACE" --meta "slot=$SLOT" --port 0
      # Now that the new instance is registered, retire the older ones of this slot only: the other slots
      # are the rest of the fleet. An instance without a .slot file was started by the single-instance
      # stack (examples/stacks/local), whose object Terraform moves to slot 0: slot 0 retires it. A failure
      # to stop one is reported but does not fail the deploy: bin/stop kills the process even when Consul
      # refused the deregistration, so its health check goes critical instead of lingering as passing.
      for old in "$INSTANCE_ROOT"/*; do
        case "$old" in "$dir" | *.unpacking) continue ;; esac
        [ "$(cat "$old/.service_name" 2>/dev/null || true)" = "$SERVICE_NAME" ] || continue
        old_slot="$(cat "$old/.slot" 2>/dev/null || echo 0)"
        [ "$old_slot" = "$SLOT" ] || continue
        if "$old/bin/stop" --instance-dir "$old"; then  # deregisters where that instance registered
          rm -rf "$old"
        else
          echo "WARNING: could not cleanly retire $old; see the message above" >&2
        fi
      done
    EOT
    interpreter = concat(local.clean_env, [
      "INSTANCE_DIR=${self.triggers.instance_dir}",
      "ARTIFACT=${self.triggers.artifact_id}",
      "CONSUL_ADDR=${var.consul_addr}",
      "DEPLOY_RUN_ID=${var.deploy_run_id}",
      "OWNER=${self.id}",
      "SERVICE_NAME=${var.service_name}",
      "SERVICE_ID=${self.triggers.service_id}",
      "SLOT=${self.triggers.slot}",
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

output "service_ids" {
  description = "The Consul service ID of each slot's instance, in slot order."
  value       = null_resource.instance[*].triggers.service_id
}

output "instance_dirs" {
  value = null_resource.instance[*].triggers.instance_dir
}

output "artifact_versions" {
  description = "The version each slot runs, in slot order."
  value       = null_resource.instance[*].triggers.artifact_version
}

# Whether each instance's files are still where it was unpacked. Outputs are evaluated again by every plan, a
# refresh-only one included, so the drift check sees files removed behind Terraform's back as this output
# leaving its state (the null provider itself reads nothing back). Each path takes its object's id (as ""),
# so that Terraform evaluates it after the create step, not at plan time, before the files exist.
output "instance_present" {
  description = "Each slot's files are in place (the .owner file its create step writes exists), in slot order."
  value = [
    for instance in null_resource.instance :
    fileexists("${instance.triggers.instance_dir}/.owner${replace(instance.id, "/.*/", "")}")
  ]
}
