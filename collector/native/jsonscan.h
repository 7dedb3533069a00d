/* collector/native/jsonscan.h: the JSON byte scanning the native modules share.
 *
 * Included by collector/worker/keyroute.c (the shard="key" NDJSON router) and
 * collector/http/batchread.c (the POST /events/batch reader). Neither validates JSON:
 * they read member names and skip values of text that is either checked elsewhere (the
 * batch envelope is decoded by msgspec first) or decoded later by its worker.
 */
#ifndef COLLECTOR_JSONSCAN_H
#define COLLECTOR_JSONSCAN_H

#include <stddef.h>

static inline int json_ws(unsigned char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; }

static inline const unsigned char *skip_ws(const unsigned char *p, const unsigned char *end) {
    while (p < end && json_ws(*p)) p++;
    return p;
}

/* p at an opening quote: the byte after the closing quote, or NULL; *esc set when the
   string holds an escape. A byte loop: member names and keys are short, and a memchr call
   per string costs more than it saves there. */
static inline const unsigned char *skip_string(const unsigned char *p, const unsigned char *end, int *esc) {
    for (p++; p < end; p++) {
        if (*p == '"') return p + 1;
        if (*p == '\\') {
            *esc = 1;
            p++;
        }
    }
    return NULL;
}

/* p at a value's first byte: the byte after the value, or NULL. *deepest is raised to the
   value's nesting depth (an array or object is 1, a scalar 0). */
static inline const unsigned char *skip_value(const unsigned char *p, const unsigned char *end, size_t *deepest) {
    int esc = 0;
    if (*p == '"') return skip_string(p, end, &esc);
    if (*p == '{' || *p == '[') {
        size_t depth = 0;
        while (p < end) {
            unsigned char c = *p;
            if (c == '"') {
                p = skip_string(p, end, &esc);
                if (p == NULL) return NULL;
                continue;
            }
            if (c == '{' || c == '[') {
                if (++depth > *deepest) *deepest = depth;
            } else if (c == '}' || c == ']') {
                if (--depth == 0) return p + 1;
            }
            p++;
        }
        return NULL;
    }
    while (p < end && *p != ',' && *p != '}' && *p != ']' && !json_ws(*p)) p++;
    return p;
}

#endif
