# The example app's image, built two ways from the same inputs:
#   source.null.local_image   -> an immutable tarball on disk (the offline artifact the local stack deploys)
#   source.amazon-ebs.ami     -> an AMI (what examples/stacks/aws deploys)
#
# Only Packer 1.6.6's built-in pieces are used (no plugin can be downloaded here).
#
#   packer build -only=null.local_image -var version=1.0.0 -var commit=abc123 -var output_dir=/tmp/images .
#
#   packer build -only=amazon-ebs.ami -var ec2_endpoint=http://127.0.0.1:5000 ...   (moto, tests)
#   packer build -only=amazon-ebs.ami_ssh -var source_ami=ami-... ...               (real AWS)
#
# The manifest post-processor writes packer-manifest.json in the working directory (run packer from this
# directory). The null builder's artifact id is a fixed string, so the image's path is recorded in the
# manifest as custom_data.image_path; the artifice post-processor also lists it in the build's `files`.

variable "namespace" {
  type        = string
  default     = "acmeinc/web"
  description = "The artifact namespace in the registry."
}

variable "service_name" {
  type        = string
  default     = "web"
  description = "The Consul service name; also the image file's prefix."
}

variable "version" {
  type        = string
  description = "The artifact version (assigned by the registry before the build)."
}

variable "commit" {
  type        = string
  description = "The source commit the artifact is built from."
}

variable "output_dir" {
  type        = string
  default     = "output"
  description = "Where the local image tarball is written."
}

variable "health_interval" {
  type    = string
  default = "10s"
}

variable "health_timeout" {
  type    = string
  default = "2s"
}

variable "aws_region" {
  type    = string
  default = "us-east-1"
}

variable "ec2_endpoint" {
  type        = string
  default     = ""
  description = "EC2 endpoint override (a moto server in tests); empty means real AWS."
}

variable "source_ami" {
  type        = string
  default     = "ami-03cf127a"
  description = "Base image. The default is one of moto's stock images; pass a real AMI id for AWS."
}

variable "ssh_username" {
  type    = string
  default = "ubuntu"
}

variable "app_port" {
  type        = number
  default     = 8080
  description = "The port the app listens on in the AMI (one instance per machine, so it is fixed)."
}

variable "instance_type" {
  type    = string
  default = "t3.micro"
}

locals {
  image_path = abspath("${var.output_dir}/${var.service_name}-${var.version}.tar.gz")
  src_dir    = abspath("${path.root}/../src")
  # Values reach the provisioners as environment variables (data), never spliced into a command line
  # (code): the commands below are constant strings, so no variable can inject shell syntax.
  assemble_env = [
    "ICD_ASSEMBLE=${abspath("${path.root}/assemble_image.py")}",
    "ICD_SRC_DIR=${local.src_dir}",
    "ICD_OUTPUT_DIR=${abspath(var.output_dir)}",
    "ICD_NAMESPACE=${var.namespace}",
    "ICD_SERVICE_NAME=${var.service_name}",
    "ICD_VERSION=${var.version}",
    "ICD_COMMIT=${var.commit}",
    "ICD_HEALTH_INTERVAL=${var.health_interval}",
    "ICD_HEALTH_TIMEOUT=${var.health_timeout}",
  ]
  install_env = [
    "SERVICE_NAME=${var.service_name}",
    "SERVICE_ID=${var.service_name}-${var.version}",
    "APP_PORT=${var.app_port}",
  ]
  # Turns the baked API-shaped definition into an agent config file: ID, fixed port, check URL.
  consul_config_script = join("; ", [
    "import json, os",
    "d = json.load(open('/opt/' + os.environ['SERVICE_NAME'] + '/consul/service.json'))",
    "d.update(ID=os.environ['SERVICE_ID'], Port=int(os.environ['APP_PORT']))",
    "d[\"Check\"][\"HTTP\"] = d[\"Check\"][\"HTTP\"].format(address=\"127.0.0.1\", port=os.environ['APP_PORT'])",
    "json.dump({\"service\": d}, open('/etc/consul.d/' + os.environ['SERVICE_NAME'] + '.json', \"w\"), indent=2)",
  ])
  image_tags = {
    Name      = "${var.service_name}-${var.version}"
    namespace = var.namespace
    version   = var.version
    commit    = var.commit
  }
}

# Nothing to boot locally: the null builder only gives the shell-local provisioner a build to run in.
source "null" "local_image" {
  communicator = "none"
}

source "amazon-ebs" "ami" {
  region        = var.aws_region
  source_ami    = var.source_ami
  instance_type = var.instance_type
  ami_name      = "${var.service_name}-${var.version}-{{timestamp}}"

  # communicator = "none" is ONLY for the moto test: moto's instances cannot be reached. A real build is
  # source.amazon-ebs.ami_ssh below: SSH plus provisioners that install the same files the local image
  # contains, and /etc/consul.d/<service>.json.
  communicator = "none"

  custom_endpoint_ec2        = var.ec2_endpoint
  skip_region_validation     = var.ec2_endpoint != ""
  skip_credential_validation = var.ec2_endpoint != ""
  skip_metadata_api_check    = var.ec2_endpoint != ""

  tags          = local.image_tags
  snapshot_tags = local.image_tags
}

# The real AMI: the same as above but reachable over SSH, so the file and shell provisioners run on it.
source "amazon-ebs" "ami_ssh" {
  region        = var.aws_region
  source_ami    = var.source_ami
  instance_type = var.instance_type
  ami_name      = "${var.service_name}-${var.version}-{{timestamp}}"
  communicator  = "ssh"
  ssh_username  = var.ssh_username
  tags          = local.image_tags
  snapshot_tags = local.image_tags
}

build {
  sources = ["source.null.local_image", "source.amazon-ebs.ami", "source.amazon-ebs.ami_ssh"]

  # Both builds assemble the image tarball: locally it IS the artifact; for the AMI it is what gets
  # uploaded and unpacked on the instance.
  provisioner "shell-local" {
    environment_vars = local.assemble_env
    inline           = ["python3 \"$ICD_ASSEMBLE\""]
  }

  # The real AMI build (source.amazon-ebs.ami_ssh) installs the image and its Consul service definition on
  # the instance. Not run here: no reachable instance (moto) and no real AWS.
  provisioner "file" {
    only        = ["amazon-ebs.ami_ssh"]
    source      = local.image_path
    destination = "/tmp/image.tar.gz"
    generated   = true # assembled by the shell-local step above
  }
  provisioner "shell" {
    only             = ["amazon-ebs.ami_ssh"]
    environment_vars = local.install_env
    inline = [
      "sudo mkdir -p \"/opt/$SERVICE_NAME\" /etc/consul.d",
      "sudo tar -xzf /tmp/image.tar.gz -C \"/opt/$SERVICE_NAME\"",
      # The agent's config file takes the same definition wrapped in {"service": ...}, with the fixed port.
      "sudo -E python3 -c \"${local.consul_config_script}\"",
    ]
  }

  post-processors {
    post-processor "artifice" {
      only  = ["null.local_image"]
      files = [local.image_path]
    }
    # No `output`: Packer's default, packer-manifest.json in the working directory, is where the adapter
    # (tasks/packer.py) reads it.
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
