# A Nomad job for this driver: the same task config Nomad's built-in qemu
# driver takes. The VM's serial console is the task's stdout.
job "vm-web" {
  datacenters = ["dc1"]

  group "web" {
    network {
      port "http" {}
    }

    task "vm" {
      driver = "qemu"

      artifact {
        source      = "https://example.com/images/web.qcow2"
        destination = "local/"
      }

      config {
        image_path        = "local/web.qcow2"
        accelerator       = "kvm"
        drive_interface   = "virtio"
        graceful_shutdown = true
        port_map {
          http = 80
        }
      }

      # StopTask: ACPI power button, then kill_signal after kill_timeout.
      kill_timeout = "30s"

      resources {
        cpu    = 1000
        memory = 1024
      }
    }
  }
}
