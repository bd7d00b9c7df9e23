//! Dumps of a whole process (`uffd-wp dump PID`): what is written, apart from how it is
//! captured.
//!
//! - [`core_file`]: the ELF core file, laid out as the kernel's own core dumps
//!   (fs/binfmt_elf.c) so that gdb reads it as it reads those: notes, one `PT_LOAD` per
//!   mapping, all-zero pages left as holes.

pub mod core_file;
