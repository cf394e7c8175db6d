# A VM that sees the alloc's directories and a host volume over virtio-9p:
# Nomad's artifacts and templates land in local/ and secrets/ as for any
# task, and the guest mounts them by tag (see docs/configuration.md, "Shared
# directories and volumes"). The guest's kernel needs 9p (Debian's generic
# kernels have it; the -cloud ones do not). In the guest:
#   mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 local /mnt/local
#   mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,ro /srv/data /srv/data
#
# The client needs the host volume, readable by the plugin's qemu_user:
#   client { host_volume "web-content" { path = "/opt/volumes/web-content" read_only = true } }
job "web-vm" {
  datacenters = ["dc1"]

  group "web" {
    network {
      port "http" {}
    }

    volume "content" {
      type      = "host"
      source    = "web-content"
      read_only = true
    }

    task "vm" {
      driver = "qemu"

      config {
        image_path       = "/srv/vm-images/debian-12-generic.qcow2"
        accelerator      = "kvm"
        disk_interface   = "virtio"
        share_alloc_dirs = true   # tags alloc, local, secrets (secrets read-only)

        port_map {
          http = 80
        }
      }

      # The guest's mount tag is the destination: "/srv/data".
      volume_mount {
        volume      = "content"
        destination = "/srv/data"
        read_only   = true
      }

      template {
        data        = "listen = 80\n"
        destination = "local/web.conf"   # the guest reads /mnt/local/web.conf
      }

      resources {
        memory = 1024
      }
    }
  }
}
