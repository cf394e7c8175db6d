# Direct kernel boot, for kernel work: no boot disk, the kernel and initrd
# come from an artifact, and the command line goes to the guest's
# /proc/cmdline. The serial console is the task's stdout.
job "kernel-test" {
  datacenters = ["dc1"]
  type        = "batch"

  group "boot" {
    task "kernel" {
      driver = "qemu"

      artifact {
        source      = "https://builds.example.com/kernels/6.6/bundle.tar.gz"
        destination = "local/"
      }

      config {
        accelerator    = "kvm"
        kernel         = "local/bzImage"
        initrd         = "local/initramfs.cpio.gz"
        kernel_cmdline = "console=ttyS0 panic=1 quiet"
        args           = ["-no-reboot"]
      }

      resources {
        cpu    = 1000
        memory = 512
      }
    }
  }
}
