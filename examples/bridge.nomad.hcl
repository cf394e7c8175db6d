# A VM on a host bridge with its own address, registered in service discovery
# from the guest itself. The client's plugin block must allow the bridge:
#
#   plugin "qemu" {
#     config {
#       image_paths       = ["/srv/vm-images"]
#       bridges_allowlist = ["br0"]
#     }
#   }
#
# br0 is an ordinary Linux bridge on the client with a DHCP server on its
# network (or the guest configures its address itself). The guest image runs
# qemu-guest-agent, which reports the address the driver advertises.
job "web-vm" {
  datacenters = ["dc1"]

  group "web" {
    task "vm" {
      driver = "qemu"

      config {
        image_path        = "/srv/vm-images/debian-12-web.qcow2"
        accelerator       = "kvm"
        graceful_shutdown = true
        guest_agent       = true

        network_mode      = "bridge"
        bridge            = "br0"   # may be left out when the allowlist has one bridge
        advertise_address = true    # StartTask waits for the guest's IPv4 address
        advertise_timeout = "3m"    # default 2m
        port_map          = { http = 80 }   # guest ports; nothing is forwarded on the host
      }

      service {
        name         = "web-vm"
        port         = "http"
        address_mode = "driver"   # the guest's own address and port 80

        check {
          type         = "http"
          path         = "/"
          interval     = "10s"
          timeout      = "2s"
          address_mode = "driver"
        }
      }

      resources {
        cpu    = 1000
        memory = 1024
      }
    }
  }
}
