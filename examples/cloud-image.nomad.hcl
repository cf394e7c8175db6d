# An Ubuntu cloud image with cloud-init: downloaded once into the verified
# image cache, a per-task overlay grown to 20 GiB, an ssh key for the default
# user (ubuntu) and user-data rendered by a Nomad template.
job "ubuntu-cloud" {
  datacenters = ["dc1"]

  group "vm" {
    network {
      port "ssh" {}
      port "http" {}
    }

    task "ubuntu" {
      driver = "qemu"

      template {
        destination = "local/user-data"
        data        = <<-EOT
          #cloud-config
          packages: [nginx]
          runcmd:
            - [systemctl, enable, --now, nginx]
        EOT
      }

      config {
        image_source   = "https://cloud-images.ubuntu.com/releases/22.04/release/ubuntu-22.04-server-cloudimg-amd64.img"
        checksum_url   = "https://cloud-images.ubuntu.com/releases/22.04/release/SHA256SUMS"
        disk_size      = "20G"
        accelerator    = "kvm"
        disk_interface = "virtio"
        graceful_shutdown = true

        cloud_init {
          user_data_file      = "local/user-data"
          ssh_authorized_keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleKeyOnlyReplaceMe ops@example"]
        }

        port_map {
          ssh  = 22
          http = 80
        }
      }

      resources {
        cpu    = 2000
        memory = 2048
      }
    }
  }
}
