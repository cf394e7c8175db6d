# A database VM with a data disk: a blank 50 GiB disk created sparse in the
# task dir at the first start and kept for the alloc, so the data survives
# task restarts and plugin restarts. The guest finds it as
# /dev/disk/by-id/virtio-pgdata.
job "postgres-vm" {
  datacenters = ["dc1"]

  group "db" {
    network {
      port "pg" {}
    }

    task "vm" {
      driver = "qemu"

      config {
        image_path        = "/srv/vm-images/postgres.qcow2"
        accelerator       = "kvm"
        disk_interface    = "virtio"
        graceful_shutdown = true

        disk {
          size    = "50GiB"
          serial  = "pgdata"
          cache   = "none"
          discard = "unmap"
        }

        # A read-only disk with reference data, from the operator's image_paths.
        disk {
          image_path = "/srv/vm-images/reference-data.qcow2"
          readonly   = true
          serial     = "refdata"
        }

        port_map {
          pg = 5432
        }
      }

      resources {
        cpu    = 2000
        memory = 4096
      }
    }
  }
}
