#ifndef UP_VERSION_H
#define UP_VERSION_H
/* ABI of the C side; bumped when a struct shared with Python changes layout. */
#define UP_ABI_VERSION 1
int up_abi_version(void);
#endif
