pub mod bootable;
pub mod manifest;
