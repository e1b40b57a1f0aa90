//! The CNI plugin executable: install it as `vxnet` in the runtime's CNI plugin directory
//! (`/usr/lib/cni/vxnet` or `/opt/cni/bin/vxnet`) and use `"type": "vxnet"` in a conflist.

fn main() -> std::process::ExitCode {
    vxnet::cni::plugin::main()
}
