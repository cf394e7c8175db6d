# Windows 11: UEFI with Secure Boot (Microsoft's keys enrolled), a TPM 2.0,
# the q35 machine, an NVMe system disk and the installer ISO in the CD-ROM.
# After installation, boot_order = "disk" (the default) boots the installed
# system; the variable store and TPM state stay in the task dir for the alloc.
job "windows11" {
  datacenters = ["dc1"]

  group "vm" {
    network {
      port "rdp" {}
    }

    task "win11" {
      driver = "qemu"

      config {
        accelerator  = "kvm"
        machine_type = "q35"
        firmware     = "uefi"
        secure_boot  = true
        tpm          = true
        net_device   = "e1000"

        cdrom_source   = "https://images.example.com/Win11_23H2_English_x64.iso"
        cdrom_checksum = "sha256:0000000000000000000000000000000000000000000000000000000000000000"

        disk {
          size      = "64GiB"
          format    = "qcow2"
          interface = "nvme"
          serial    = "system"
        }

        port_map {
          rdp = 3389
        }
      }

      resources {
        cpu    = 4000
        memory = 8192
      }
    }
  }
}
