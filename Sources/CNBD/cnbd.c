#include <stddef.h>
#include "CNBD.h"

const unsigned int CNBD_FLAG_FUA = LIBNBD_CMD_FLAG_FUA;
const unsigned int CNBD_FLAG_NO_HOLE = LIBNBD_CMD_FLAG_NO_HOLE;
const unsigned int CNBD_DIRECTION_READ = LIBNBD_AIO_DIRECTION_READ;
const unsigned int CNBD_DIRECTION_WRITE = LIBNBD_AIO_DIRECTION_WRITE;

int64_t cnbd_aio_pread(struct nbd_handle *h, void *buf, size_t count, uint64_t offset) {
    return nbd_aio_pread(h, buf, count, offset, NBD_NULL_COMPLETION, 0);
}

int64_t cnbd_aio_pwrite(struct nbd_handle *h, const void *buf, size_t count, uint64_t offset, uint32_t flags) {
    return nbd_aio_pwrite(h, buf, count, offset, NBD_NULL_COMPLETION, flags);
}

int64_t cnbd_aio_flush(struct nbd_handle *h) {
    return nbd_aio_flush(h, NBD_NULL_COMPLETION, 0);
}

int64_t cnbd_aio_trim(struct nbd_handle *h, uint64_t count, uint64_t offset) {
    return nbd_aio_trim(h, count, offset, NBD_NULL_COMPLETION, 0);
}

int64_t cnbd_aio_zero(struct nbd_handle *h, uint64_t count, uint64_t offset, uint32_t flags) {
    return nbd_aio_zero(h, count, offset, NBD_NULL_COMPLETION, flags);
}
