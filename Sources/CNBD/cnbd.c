#include "CNBD.h"

const unsigned int CNBD_FLAG_FUA = LIBNBD_CMD_FLAG_FUA;
const unsigned int CNBD_FLAG_NO_HOLE = LIBNBD_CMD_FLAG_NO_HOLE;
