// libnbd (Debian libnbd-dev) for Swift: the NBD client side of device routes. libnbd's API is plain
// C functions over an opaque handle, callable from Swift as they are; this target only makes the
// header a module and links the library.
#ifndef CNBD_H
#define CNBD_H
#include <libnbd.h>

/// LIBNBD_CMD_FLAG_FUA and LIBNBD_CMD_FLAG_NO_HOLE as constants (macros are not visible to Swift).
extern const unsigned int CNBD_FLAG_FUA;
extern const unsigned int CNBD_FLAG_NO_HOLE;
#endif
