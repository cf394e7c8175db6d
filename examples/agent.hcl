# A Nomad client agent that loads nomad-driver-qemu from plugin_dir. Because
# the plugin is named "qemu" and its version is above the built-in driver's, it
# replaces Nomad's own qemu driver; existing jobs run on it unchanged.
data_dir   = "/opt/nomad/data"
plugin_dir = "/opt/nomad/plugins" # holds the nomad-driver-qemu binary

client {
  enabled = true
}

plugin "qemu" {
  config {
    # Where images may come from besides the allocation directory.
    image_paths = ["/srv/vm-images"]
    # QEMU options jobs may pass through `args` (empty: any).
    args_allowlist = ["-smp", "-cpu", "-device", "-netdev"]
    # Emulators jobs may use (empty: any found on PATH).
    emulators_allowlist = ["x86_64"]
    # Where jobs' image_source/checksum_url may download from (empty: any
    # http/https URL). Link-local addresses are refused unless named here.
    image_source_allowlist = ["https://images.example.com/vm/"]
  }
}
