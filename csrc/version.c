#include "version.h"

int up_abi_version(void) { return UP_ABI_VERSION; }
