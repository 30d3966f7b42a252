# The image of __SERVICE_NAME__ (__NAMESPACE__): the service, its start/stop scripts and its Consul service
# definition in one tarball, built by build-artifact for every push. What the pipeline passes to this
# template and what it reads back is the service contract: docs/service-contract.md in immutable-cd.
#
# By hand, from this directory (the manifest lands in packer-manifest.json here):
#   packer build -only=null.local_image -var version=1 -var commit=$(git rev-parse HEAD) -var output_dir=/tmp/images .

# Contract: the variables build-artifact passes. Every one must be declared; the defaults serve builds by hand.
variable "namespace" {
  type    = string
  default = "__NAMESPACE__"
}

variable "service_name" {
  type    = string
  default = "__SERVICE_NAME__"
}

variable "version" {
  type        = string
  description = "The build label; baked into the image, its Consul Meta (artifact_version) and its file name."
}

variable "commit" {
  type = string
}

variable "output_dir" {
  type    = string
  default = "output"
}

variable "health_interval" {
  type    = string
  default = "10s"
}

variable "health_timeout" {
  type    = string
  default = "2s"
}

locals {
  image_path = abspath("${var.output_dir}/${var.service_name}-${var.version}.tar.gz")
  # Values reach the provisioner as environment variables (data); its command is a constant string, so no
  # variable can inject shell syntax.
  assemble_env = [
    "ICD_ASSEMBLE=${abspath("${path.root}/assemble_image.py")}",
    "ICD_SRC_DIR=${abspath("${path.root}/../src")}",
    "ICD_OUTPUT_DIR=${abspath(var.output_dir)}",
    "ICD_NAMESPACE=${var.namespace}",
    "ICD_SERVICE_NAME=${var.service_name}",
    "ICD_VERSION=${var.version}",
    "ICD_COMMIT=${var.commit}",
    "ICD_HEALTH_INTERVAL=${var.health_interval}",
    "ICD_HEALTH_TIMEOUT=${var.health_timeout}",
  ]
}

# Contract: build-artifact builds -only=null.local_image unless the namespace's packer_only says otherwise.
# Nothing boots: the null builder only gives the shell-local provisioner a build to run in.
source "null" "local_image" {
  communicator = "none"
}

build {
  sources = ["source.null.local_image"]

  provisioner "shell-local" {
    environment_vars = local.assemble_env
    inline           = ["python3 \"$ICD_ASSEMBLE\""]
  }

  post-processors {
    post-processor "artifice" {
      files = [local.image_path]
    }
    # Contract: the manifest, without `output`, so it lands in packer-manifest.json where build-artifact
    # reads it; a local image is the file named by custom_data.image_path.
    post-processor "manifest" {
      custom_data = {
        image_path = local.image_path
        namespace  = var.namespace
        version    = var.version
        commit     = var.commit
      }
    }
  }
}
