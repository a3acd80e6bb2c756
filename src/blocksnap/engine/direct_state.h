/* The layout of the state engine/direct.py shares with the compiled direct path
 * (engine/_direct.c, fuse/_fastfuse.c): uint64 words, named here once. */
#ifndef BLOCKSNAP_DIRECT_STATE_H
#define BLOCKSNAP_DIRECT_STATE_H

#define FALLBACK (-100000)   /* not done: the Python path takes the request */

/* header */
#define H_LOCK 0      /* address of the pool lock's pthread_rwlock_t */
#define H_PTR 1       /* address of the page pool's ptr array (pages x entries) */
#define H_CSUM 2      /* address of its csum array */
#define H_ENTRIES 3   /* entries per page */
#define H_UNIT 4      /* bytes per store unit */
#define H_FD 5        /* the data store's file descriptor */
#define H_IMAGES 6    /* image slots after the header */
#define H_WORDS 8

/* per image */
#define IM_ACTIVE 0
#define IM_SIZE 1
#define IM_BS 2
#define IM_PENDING 3      /* the write-behind queue cannot be told apart (an error): no direct request */
#define IM_TABLE 4        /* address of its lease table (rows of 4 words) */
#define IM_MASK 5         /* row = block & mask (rows: a power of two) */
#define IM_LAST_WRITE 6   /* ns, last direct write */
#define IM_READS 7
#define IM_WRITES 8
#define IM_KIND 9         /* KIND_ROW, or KIND_COW: the live data is the origin file, as is */
#define IM_FD 10          /* COW: the origin's file descriptor, while IM_COW_OK */
#define IM_COW_OK 11      /* COW: reads may go to the origin (revoked with the leases) */
#define IM_QUEUED 12      /* QUEUE_SLOTS pairs [lo, hi) of bytes the queue holds (hi 0: free) */
#define QUEUE_SLOTS 8
#define KIND_ROW 0
#define KIND_COW 1
#define IM_WORDS 32

/* lease rows */
#define L_TAG 0
#define L_PAGE 1
#define L_UNIT 2
#define L_FLAGS 3
#define LEASE_READ 1
#define LEASE_WRITE 2
#define LEASE_WRITTEN 256

#endif
