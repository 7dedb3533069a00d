/* collector/native/crc32.h: zlib's crc32, the pipelines' shard hash (ShardMap.of).
 *
 * Included by collector/worker/keyroute.c (routes NDJSON lines to their key's owner) and
 * collector/http/batchread.c (makes generated ids that belong to a chosen worker). Both
 * must agree with zlib.crc32 bit for bit: tests/unit/test_keyroute.py and
 * tests/unit/test_batchread.py check them against it.
 */
#ifndef COLLECTOR_CRC32_H
#define COLLECTOR_CRC32_H

#include <stddef.h>
#include <stdint.h>

/* slicing by 8: a key of 8 bytes or more costs one step per 8 bytes */
static uint32_t crc_table[8][256];

/* Fill the tables; call once, from the module's init. */
static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc_table[t][i] = crc_table[0][crc_table[t - 1][i] & 0xFF] ^ (crc_table[t - 1][i] >> 8);
}

/* The running state after n more bytes (start from CRC_START, finish with crc_end):
   a common prefix is hashed once and each suffix continues from its state. */
#define CRC_START 0xFFFFFFFFu

static uint32_t crc_update(uint32_t c, const unsigned char *p, size_t n) {
    for (; n >= 8; n -= 8, p += 8) {
        uint32_t lo = c ^ ((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24);
        uint32_t hi = (uint32_t)p[4] | (uint32_t)p[5] << 8 | (uint32_t)p[6] << 16 | (uint32_t)p[7] << 24;
        c = crc_table[7][lo & 0xFF] ^ crc_table[6][(lo >> 8) & 0xFF] ^ crc_table[5][(lo >> 16) & 0xFF] ^
            crc_table[4][lo >> 24] ^ crc_table[3][hi & 0xFF] ^ crc_table[2][(hi >> 8) & 0xFF] ^
            crc_table[1][(hi >> 16) & 0xFF] ^ crc_table[0][hi >> 24];
    }
    while (n--) c = crc_table[0][(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c;
}

static inline uint32_t crc_end(uint32_t c) { return c ^ 0xFFFFFFFFu; }

/* zlib.crc32 of the bytes */
static inline uint32_t crc32_of(const unsigned char *p, size_t n) { return crc_end(crc_update(CRC_START, p, n)); }

#endif
