// libnbd (Debian libnbd-dev) for Swift: the NBD client side of device routes. libnbd's API is plain
// C functions over an opaque handle, callable from Swift as they are; this target makes the header a
// module, links the library, and wraps the asynchronous calls without completion callbacks (the Swift
// client collects finished commands by cookie instead).
#ifndef CNBD_H
#define CNBD_H
#include <libnbd.h>

/// LIBNBD_CMD_FLAG_FUA and LIBNBD_CMD_FLAG_NO_HOLE as constants (macros are not visible to Swift).
extern const unsigned int CNBD_FLAG_FUA;
extern const unsigned int CNBD_FLAG_NO_HOLE;
/// LIBNBD_AIO_DIRECTION_READ and _WRITE.
extern const unsigned int CNBD_DIRECTION_READ;
extern const unsigned int CNBD_DIRECTION_WRITE;

/// nbd_aio_* with NBD_NULL_COMPLETION: each returns the command's cookie (>= 1) or -1.
int64_t cnbd_aio_pread(struct nbd_handle *h, void *buf, size_t count, uint64_t offset);
int64_t cnbd_aio_pwrite(struct nbd_handle *h, const void *buf, size_t count, uint64_t offset, uint32_t flags);
int64_t cnbd_aio_flush(struct nbd_handle *h);
int64_t cnbd_aio_trim(struct nbd_handle *h, uint64_t count, uint64_t offset);
int64_t cnbd_aio_zero(struct nbd_handle *h, uint64_t count, uint64_t offset, uint32_t flags);
#endif
