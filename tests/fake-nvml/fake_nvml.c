/*
 * fake_nvml.c - a stand-in for libnvidia-ml.so.1, for tests on machines
 * without an NVIDIA GPU.
 *
 * It implements the subset of NVML that nvml-wrapper 0.13 (and our agent)
 * uses, with the state taken from a text file, so that tests exercise the
 * real wrapper code path (dlopen, symbol lookup, struct layouts, return
 * codes) rather than a Rust-level mock.  See README.md for the file format.
 *
 * Types and constants are copied from NVML's ABI (as mirrored by
 * nvml-wrapper-sys 0.10 bindings.rs) instead of including nvml.h, which is
 * not available on test machines.
 *
 * Build: cc -shared -fPIC -O2 -Wall -Werror -o libnvidia-ml.so.1 fake_nvml.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

/* ---- NVML ABI ---------------------------------------------------------- */

typedef unsigned int nvmlReturn_t;

enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_GPU_IS_LOST = 15,
    NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25,
    NVML_ERROR_UNKNOWN = 999,
};

enum { NVML_TEMPERATURE_GPU = 0 };
enum { NVML_CLOCK_GRAPHICS = 0, NVML_CLOCK_SM = 1, NVML_CLOCK_MEM = 2, NVML_CLOCK_VIDEO = 3 };

/* Returned in nvmlProcessInfo_t fields that have no value. */
#define NVML_VALUE_NOT_AVAILABLE_ULL 0xFFFFFFFFFFFFFFFFULL
#define NVML_NO_INSTANCE_ID 0xFFFFFFFFU

typedef struct nvmlDevice_st {
    /* Never read: a handle's identity is its address (see resolve()). */
    unsigned char unused;
} *nvmlDevice_t;

typedef struct {
    char busIdLegacy[16];
    unsigned int domain;
    unsigned int bus;
    unsigned int device;
    unsigned int pciDeviceId;
    unsigned int pciSubSystemId;
    char busId[32];
} nvmlPciInfo_t;

typedef struct {
    unsigned long long total;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_t;

typedef struct {
    unsigned int version;
    unsigned long long total;
    unsigned long long reserved;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_v2_t;

/* NVML_STRUCT_VERSION(Memory, 2) from nvml.h. */
#define NVML_MEMORY_V2 ((unsigned int)(sizeof(nvmlMemory_v2_t) | (2u << 24)))

typedef struct {
    unsigned int gpu;
    unsigned int memory;
} nvmlUtilization_t;

/* nvmlProcessInfo_v2_t, which is what the _v3 process queries fill. */
typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
} nvmlProcessInfo_t;

/* GPU Performance Monitoring (nvml.h 12.x; nvml-wrapper-sys 0.10 bindings). */
#define NVML_GPM_METRIC_GRAPHICS_UTIL 1
#define NVML_GPM_METRIC_MAX 210
#define NVML_GPM_METRICS_GET_VERSION 1
#define NVML_GPM_SUPPORT_VERSION 1

typedef struct fake_gpm_sample *nvmlGpmSample_t;

typedef struct {
    unsigned int metricId;
    nvmlReturn_t nvmlReturn;
    double value;
    struct {
        char *shortName;
        char *longName;
        char *unit;
    } metricInfo;
} nvmlGpmMetric_t;

typedef struct {
    unsigned int version;
    unsigned int numMetrics;
    nvmlGpmSample_t sample1;
    nvmlGpmSample_t sample2;
    nvmlGpmMetric_t metrics[NVML_GPM_METRIC_MAX];
} nvmlGpmMetricsGet_t;

typedef struct {
    unsigned int version;
    unsigned int isSupportedDevice;
} nvmlGpmSupport_t;

/* Buffer sizes NVML documents for its string getters. */
#define NAME_LEN 96        /* NVML_DEVICE_NAME_V2_BUFFER_SIZE */
#define UUID_LEN 96        /* NVML_DEVICE_UUID_V2_BUFFER_SIZE */
#define BUS_ID_LEN 32      /* NVML_DEVICE_PCI_BUS_ID_BUFFER_SIZE */
#define VERSION_LEN 80     /* NVML_SYSTEM_DRIVER_VERSION_BUFFER_SIZE */

/* ---- configuration state ------------------------------------------------ */

#define MAX_GPUS 16
#define MAX_MIGS 8
#define MAX_PROCS 64

/*
 * A numeric field that is absent from the config or written as "ns".  Its
 * getter answers NOT_SUPPORTED, so tests can model hardware that lacks a
 * sensor.  (Real values never reach 2^64-1.)
 */
#define NS UINT64_MAX

struct fake_mig {
    int present;
    char uuid[UUID_LEN];
    char name[NAME_LEN];
    uint64_t gi, ci, mem_total, mem_used;
    uint64_t gr_active; /* % of time busy, for GPM; NS = 0 */
};

struct fake_proc {
    uint64_t pid, used_mem, gi, ci;
};

struct fake_gpu {
    int present;
    int lost;
    unsigned int index;
    char uuid[UUID_LEN];
    char name[NAME_LEN];
    char bus_id[BUS_ID_LEN];
    unsigned int pci_domain, pci_bus, pci_device;
    uint64_t pci_device_id, pci_subsys_id;
    uint64_t minor, mem_total, mem_used, mem_reserved;
    uint64_t util_gpu, util_mem, temp, power_mw, energy_mj;
    uint64_t sm_clock, mem_clock, mig_current, mig_pending, max_mig;
    uint64_t gpm; /* 1: GPM supported (Hopper and newer) */
    struct fake_mig migs[MAX_MIGS]; /* slot = the mig record's index */
    unsigned int nprocs;
    struct fake_proc procs[MAX_PROCS];
};

struct fake_config {
    char driver_version[VERSION_LEN]; /* "" = not set */
    uint64_t cuda_driver_version;
    uint64_t init_error;
    unsigned int gpu_count;
    struct fake_gpu gpus[MAX_GPUS]; /* slot = the gpu record's index */
};

/*
 * One lock serialises everything: the wrapper may query from several
 * threads while a collection cycle re-reads the file, and the per-call cost
 * is irrelevant for tests.
 */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct fake_config cfg;
/* Parse target; swapped into cfg only when the whole file is valid, so a bad
 * rewrite never leaves half-applied state behind. */
static struct fake_config scratch;
static unsigned int init_refcount;
static unsigned long long call_count;

/*
 * Handles are addresses inside these arrays and are never freed, so a handle
 * the caller got before a re-read stays a valid pointer; it just stops
 * resolving (INVALID_ARGUMENT) if its record was removed.
 */
static struct nvmlDevice_st gpu_handles[MAX_GPUS];
static struct nvmlDevice_st mig_handles[MAX_GPUS][MAX_MIGS];

/*
 * GPM counters: per GPU (slot MAX_MIGS) and per MIG device, the nanoseconds
 * its engine has been busy, accrued at the configured percentage of wall
 * time.  They live outside cfg so that a config rewrite changes the rate
 * from then on without resetting what accrued, as a real counter behaves.
 */
struct gpm_counter {
    uint64_t last_ns;   /* monotonic time accrued up to; 0 = never */
    uint64_t active_ns; /* busy time so far */
};
static struct gpm_counter gpm_counters[MAX_GPUS][MAX_MIGS + 1];

static uint64_t mono_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* Busy percentage of a GPU (slot MAX_MIGS) or MIG device under cfg. */
static uint64_t gpm_rate(unsigned int gpu, unsigned int slot)
{
    const struct fake_gpu *g = &cfg.gpus[gpu];
    uint64_t r;

    if (!g->present)
        return 0;
    if (slot == MAX_MIGS)
        r = g->util_gpu;
    else
        r = g->migs[slot].present ? g->migs[slot].gr_active : NS;
    return r == NS ? 0 : r;
}

static void gpm_advance(unsigned int gpu, unsigned int slot, uint64_t now)
{
    struct gpm_counter *c = &gpm_counters[gpu][slot];

    if (c->last_ns != 0 && now > c->last_ns)
        c->active_ns += (now - c->last_ns) * gpm_rate(gpu, slot) / 100;
    c->last_ns = now;
}

static void gpm_advance_all(void)
{
    uint64_t now = mono_ns();
    unsigned int g, m;

    for (g = 0; g < MAX_GPUS; g++)
        for (m = 0; m <= MAX_MIGS; m++)
            if (gpm_counters[g][m].last_ns != 0)
                gpm_advance(g, m, now);
}

/* ---- config parsing ----------------------------------------------------- */

static void config_path(char *out, size_t len)
{
    const char *env = getenv("FAKE_NVML_CONFIG");
    Dl_info info;

    if (env != NULL && env[0] != '\0') {
        snprintf(out, len, "%s", env);
        return;
    }
    /* Each test copies the library into its own directory; keying the config
     * on the library's own path lets those copies run side by side in one
     * process, since dlopen treats distinct files as distinct instances. */
    if (dladdr((void *)&config_path, &info) != 0 && info.dli_fname != NULL)
        snprintf(out, len, "%s.conf", info.dli_fname);
    else
        snprintf(out, len, "libnvidia-ml.so.1.conf");
}

struct parse_ctx {
    const char *path;
    unsigned int line;
};

static int parse_error(const struct parse_ctx *ctx, const char *msg, const char *what)
{
    fprintf(stderr, "fake-nvml: %s:%u: %s%s%s\n", ctx->path, ctx->line, msg,
            what != NULL ? ": " : "", what != NULL ? what : "");
    return -1;
}

/* Decimal, or hex with 0x; "ns" means not supported.  Leading zeros stay
 * decimal on purpose (no octal surprises). */
static int parse_u64(const struct parse_ctx *ctx, const char *s, uint64_t max, uint64_t *out)
{
    const char *digits = s;
    int base = 10;
    unsigned long long v;
    char *end;

    if (strcmp(s, "ns") == 0) {
        *out = NS;
        return 0;
    }
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        digits = s + 2;
    }
    /* strtoull would accept signs and leading blanks; a fixture never means those. */
    if (!(base == 16 ? isxdigit((unsigned char)*digits) : isdigit((unsigned char)*digits)))
        return parse_error(ctx, "not a number", s);
    errno = 0;
    v = strtoull(digits, &end, base);
    if (errno != 0 || *end != '\0' || v > max)
        return parse_error(ctx, "bad or out-of-range number", s);
    *out = v;
    return 0;
}

static int parse_str(const struct parse_ctx *ctx, const char *s, char *out, size_t len)
{
    if (strlen(s) + 1 > len)
        return parse_error(ctx, "value too long", s);
    memcpy(out, s, strlen(s) + 1);
    return 0;
}

/* Splits "key=value"; returns the value, or NULL after reporting. */
static char *split_kv(const struct parse_ctx *ctx, char *field)
{
    char *eq = strchr(field, '=');

    if (eq == NULL || eq == field) {
        parse_error(ctx, "expected key=value", field);
        return NULL;
    }
    *eq = '\0';
    return eq + 1;
}

/* Numeric gpu keys; all of them start out NS (see parse_gpu). */
static const struct {
    const char *key;
    size_t offset;
    uint64_t max;
} gpu_numeric_keys[] = {
#define KEY(name, max) { #name, offsetof(struct fake_gpu, name), max }
    KEY(minor, UINT32_MAX),         KEY(mem_total, NS - 1),    KEY(mem_used, NS - 1),
    KEY(mem_reserved, NS - 1),      KEY(util_gpu, UINT32_MAX), KEY(util_mem, UINT32_MAX),
    KEY(temp, UINT32_MAX),          KEY(power_mw, UINT32_MAX), KEY(energy_mj, NS - 1),
    KEY(sm_clock, UINT32_MAX),      KEY(mem_clock, UINT32_MAX), KEY(mig_current, UINT32_MAX),
    KEY(mig_pending, UINT32_MAX),   KEY(max_mig, UINT32_MAX),  KEY(pci_device_id, UINT32_MAX),
    KEY(pci_subsys_id, UINT32_MAX), KEY(gpm, 1),
#undef KEY
};

static int parse_gpu(const struct parse_ctx *ctx, char **fields, int n, unsigned int ordinal)
{
    struct fake_gpu g;
    uint64_t index = ordinal, lost = 0;
    size_t k;
    int i;

    memset(&g, 0, sizeof(g));
    g.present = 1;
    for (k = 0; k < sizeof(gpu_numeric_keys) / sizeof(gpu_numeric_keys[0]); k++)
        *(uint64_t *)((char *)&g + gpu_numeric_keys[k].offset) = NS;

    for (i = 0; i < n; i++) {
        char *key = fields[i], *val = split_kv(ctx, fields[i]);
        int rc = -2;

        if (val == NULL)
            return -1;
        for (k = 0; k < sizeof(gpu_numeric_keys) / sizeof(gpu_numeric_keys[0]); k++) {
            if (strcmp(key, gpu_numeric_keys[k].key) == 0) {
                rc = parse_u64(ctx, val, gpu_numeric_keys[k].max,
                               (uint64_t *)((char *)&g + gpu_numeric_keys[k].offset));
                break;
            }
        }
        if (rc != -2) {
            /* handled by the table */
        } else if (strcmp(key, "index") == 0) {
            rc = parse_u64(ctx, val, MAX_GPUS - 1, &index);
            if (rc == 0 && index == NS)
                rc = parse_error(ctx, "index cannot be ns", NULL);
        } else if (strcmp(key, "uuid") == 0) {
            rc = parse_str(ctx, val, g.uuid, sizeof(g.uuid));
        } else if (strcmp(key, "name") == 0) {
            rc = parse_str(ctx, val, g.name, sizeof(g.name));
        } else if (strcmp(key, "bus_id") == 0) {
            unsigned int function;
            char tail;

            rc = parse_str(ctx, val, g.bus_id, sizeof(g.bus_id));
            /* PciInfo needs the numeric parts too; reject what real NVML
             * could never report rather than invent numbers. */
            if (rc == 0 && sscanf(val, "%x:%x:%x.%x%c", &g.pci_domain, &g.pci_bus,
                                  &g.pci_device, &function, &tail) != 4)
                rc = parse_error(ctx, "bus_id must look like 00000000:07:00.0", val);
        } else if (strcmp(key, "lost") == 0) {
            rc = parse_u64(ctx, val, 1, &lost);
            if (rc == 0 && lost == NS)
                rc = parse_error(ctx, "lost must be 0 or 1", NULL);
        } else {
            rc = parse_error(ctx, "unknown gpu key", key);
        }
        if (rc != 0)
            return -1;
    }
    /* Reserved memory only refines the memory query, so leaving it out
     * means "none" rather than making memory unsupported. */
    if (g.mem_reserved == NS)
        g.mem_reserved = 0;
    /* PCI ids have no getter of their own; unknown ids read as 0. */
    if (g.pci_device_id == NS)
        g.pci_device_id = 0;
    if (g.pci_subsys_id == NS)
        g.pci_subsys_id = 0;
    if (scratch.gpus[index].present)
        return parse_error(ctx, "duplicate gpu index", NULL);
    g.index = (unsigned int)index;
    g.lost = (int)lost;
    scratch.gpus[index] = g;
    scratch.gpu_count++;
    return 0;
}

/* mig and proc records may precede their gpu line, so they are parsed into
 * holding areas and attached once the whole file has been read. */
struct pending_mig {
    unsigned int line, parent, index;
    struct fake_mig mig;
};
struct pending_proc {
    unsigned int line, gpu;
    struct fake_proc proc;
};
static struct pending_mig pending_migs[MAX_GPUS * MAX_MIGS];
static unsigned int npending_migs;
static struct pending_proc pending_procs[MAX_GPUS * MAX_PROCS];
static unsigned int npending_procs;

static int parse_mig(const struct parse_ctx *ctx, char **fields, int n)
{
    struct pending_mig p;
    uint64_t parent = NS, index = NS;
    int i;

    if (npending_migs == MAX_GPUS * MAX_MIGS)
        return parse_error(ctx, "too many mig records", NULL);
    memset(&p, 0, sizeof(p));
    p.mig.present = 1;
    p.mig.gi = p.mig.ci = p.mig.mem_total = p.mig.mem_used = p.mig.gr_active = NS;
    for (i = 0; i < n; i++) {
        char *key = fields[i], *val = split_kv(ctx, fields[i]);
        int rc;

        if (val == NULL)
            return -1;
        if (strcmp(key, "parent") == 0)
            rc = parse_u64(ctx, val, MAX_GPUS - 1, &parent);
        else if (strcmp(key, "index") == 0)
            rc = parse_u64(ctx, val, MAX_MIGS - 1, &index);
        else if (strcmp(key, "uuid") == 0)
            rc = parse_str(ctx, val, p.mig.uuid, sizeof(p.mig.uuid));
        else if (strcmp(key, "name") == 0)
            rc = parse_str(ctx, val, p.mig.name, sizeof(p.mig.name));
        else if (strcmp(key, "gi") == 0)
            rc = parse_u64(ctx, val, UINT32_MAX - 1, &p.mig.gi);
        else if (strcmp(key, "ci") == 0)
            rc = parse_u64(ctx, val, UINT32_MAX - 1, &p.mig.ci);
        else if (strcmp(key, "mem_total") == 0)
            rc = parse_u64(ctx, val, NS - 1, &p.mig.mem_total);
        else if (strcmp(key, "mem_used") == 0)
            rc = parse_u64(ctx, val, NS - 1, &p.mig.mem_used);
        else if (strcmp(key, "gr_active") == 0)
            rc = parse_u64(ctx, val, 100, &p.mig.gr_active);
        else
            rc = parse_error(ctx, "unknown mig key", key);
        if (rc != 0)
            return -1;
    }
    if (parent == NS || index == NS)
        return parse_error(ctx, "mig needs parent= and index=", NULL);
    p.line = ctx->line;
    p.parent = (unsigned int)parent;
    p.index = (unsigned int)index;
    pending_migs[npending_migs++] = p;
    return 0;
}

static int parse_proc(const struct parse_ctx *ctx, char **fields, int n)
{
    struct pending_proc p;
    uint64_t gpu = NS;
    int i;

    if (npending_procs == MAX_GPUS * MAX_PROCS)
        return parse_error(ctx, "too many proc records", NULL);
    p.proc.pid = NS;
    p.proc.used_mem = p.proc.gi = p.proc.ci = NS;
    for (i = 0; i < n; i++) {
        char *key = fields[i], *val = split_kv(ctx, fields[i]);
        int rc;

        if (val == NULL)
            return -1;
        if (strcmp(key, "gpu") == 0)
            rc = parse_u64(ctx, val, MAX_GPUS - 1, &gpu);
        else if (strcmp(key, "pid") == 0)
            rc = parse_u64(ctx, val, UINT32_MAX, &p.proc.pid);
        else if (strcmp(key, "used_mem") == 0)
            rc = parse_u64(ctx, val, NS - 1, &p.proc.used_mem);
        else if (strcmp(key, "gi") == 0)
            rc = parse_u64(ctx, val, UINT32_MAX - 1, &p.proc.gi);
        else if (strcmp(key, "ci") == 0)
            rc = parse_u64(ctx, val, UINT32_MAX - 1, &p.proc.ci);
        else
            rc = parse_error(ctx, "unknown proc key", key);
        if (rc != 0)
            return -1;
    }
    if (gpu == NS || p.proc.pid == NS)
        return parse_error(ctx, "proc needs gpu= and pid=", NULL);
    p.line = ctx->line;
    p.gpu = (unsigned int)gpu;
    pending_procs[npending_procs++] = p;
    return 0;
}

static int attach_pending(struct parse_ctx *ctx)
{
    unsigned int i;

    for (i = 0; i < npending_migs; i++) {
        struct pending_mig *p = &pending_migs[i];
        struct fake_gpu *g = &scratch.gpus[p->parent];

        ctx->line = p->line;

        if (!g->present)
            return parse_error(ctx, "mig record names a parent gpu that does not exist", NULL);
        if (g->migs[p->index].present)
            return parse_error(ctx, "duplicate mig index for one parent", NULL);
        g->migs[p->index] = p->mig;
    }
    for (i = 0; i < npending_procs; i++) {
        struct pending_proc *p = &pending_procs[i];
        struct fake_gpu *g = &scratch.gpus[p->gpu];

        ctx->line = p->line;

        if (!g->present)
            return parse_error(ctx, "proc record names a gpu that does not exist", NULL);
        if (g->nprocs == MAX_PROCS)
            return parse_error(ctx, "too many procs on one gpu", NULL);
        g->procs[g->nprocs++] = p->proc;
    }
    return 0;
}

/* Reads the config into cfg.  Called with the lock held.  On any error the
 * previous state is kept and the reason goes to stderr, so a typo in a test
 * fixture fails loudly instead of silently reporting fewer GPUs. */
static int load_config(void)
{
    char path[PATH_MAX + 8];
    struct parse_ctx ctx;
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    unsigned int ordinal = 0;
    int rc = 0;
    FILE *f;

    config_path(path, sizeof(path));
    ctx.path = path;
    ctx.line = 0;
    f = fopen(path, "r");
    if (f == NULL) {
        fprintf(stderr, "fake-nvml: cannot open config %s: %s\n", path, strerror(errno));
        return -1;
    }

    memset(&scratch, 0, sizeof(scratch));
    scratch.cuda_driver_version = NS;
    scratch.init_error = NS;
    npending_migs = npending_procs = 0;

    while (rc == 0 && (len = getline(&line, &cap, f)) >= 0) {
        char *fields[64], *p = line, *kind;
        int n = 0;

        ctx.line++;
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r'))
            line[--len] = '\0';
        while (*p == ' ' || *p == '\t')
            p++;
        if (*p == '\0' || *p == '#')
            continue;

        kind = strsep(&p, "\t");
        while (p != NULL && n < (int)(sizeof(fields) / sizeof(fields[0])))
            fields[n++] = strsep(&p, "\t");
        if (p != NULL) {
            rc = parse_error(&ctx, "too many fields", NULL);
            break;
        }

        if (strcmp(kind, "driver_version") == 0) {
            rc = n == 1 ? parse_str(&ctx, fields[0], scratch.driver_version,
                                    sizeof(scratch.driver_version))
                        : parse_error(&ctx, "driver_version takes one value", NULL);
        } else if (strcmp(kind, "cuda_driver_version") == 0) {
            rc = n == 1 ? parse_u64(&ctx, fields[0], INT32_MAX, &scratch.cuda_driver_version)
                        : parse_error(&ctx, "cuda_driver_version takes one value", NULL);
        } else if (strcmp(kind, "init_error") == 0) {
            rc = n == 1 ? parse_u64(&ctx, fields[0], UINT32_MAX, &scratch.init_error)
                        : parse_error(&ctx, "init_error takes one value", NULL);
        } else if (strcmp(kind, "gpu") == 0) {
            rc = ordinal < MAX_GPUS ? parse_gpu(&ctx, fields, n, ordinal)
                                    : parse_error(&ctx, "too many gpu records", NULL);
            ordinal++;
        } else if (strcmp(kind, "mig") == 0) {
            rc = parse_mig(&ctx, fields, n);
        } else if (strcmp(kind, "proc") == 0) {
            rc = parse_proc(&ctx, fields, n);
        } else {
            rc = parse_error(&ctx, "unknown record kind", kind);
        }
    }
    free(line);
    fclose(f);
    if (rc == 0)
        rc = attach_pending(&ctx);
    if (rc == 0) {
        /* Busy time so far accrued at the old rates; the new ones apply from now. */
        gpm_advance_all();
        cfg = scratch;
    }
    return rc;
}

/* ---- helpers shared by the entry points ---------------------------------- */

static void enter(void)
{
    __atomic_add_fetch(&call_count, 1, __ATOMIC_RELAXED);
    pthread_mutex_lock(&lock);
}

static nvmlReturn_t leave(nvmlReturn_t rc)
{
    pthread_mutex_unlock(&lock);
    return rc;
}

/*
 * Maps a handle to its records.  *mig is NULL for a whole-GPU handle.  A lost
 * GPU poisons its MIG devices too, as on real hardware where they share the
 * bus link.
 */
static nvmlReturn_t resolve(nvmlDevice_t dev, struct fake_gpu **gpu, struct fake_mig **mig)
{
    uintptr_t p = (uintptr_t)dev;
    uintptr_t g0 = (uintptr_t)gpu_handles, m0 = (uintptr_t)mig_handles;
    unsigned int gi, mi;

    if (init_refcount == 0)
        return NVML_ERROR_UNINITIALIZED;
    if (p >= g0 && p < g0 + sizeof(gpu_handles)) {
        gi = (unsigned int)((p - g0) / sizeof(gpu_handles[0]));
        *mig = NULL;
    } else if (p >= m0 && p < m0 + sizeof(mig_handles)) {
        unsigned int slot = (unsigned int)((p - m0) / sizeof(mig_handles[0][0]));
        gi = slot / MAX_MIGS;
        mi = slot % MAX_MIGS;
        if (!cfg.gpus[gi].migs[mi].present)
            return NVML_ERROR_INVALID_ARGUMENT;
        *mig = &cfg.gpus[gi].migs[mi];
    } else {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    *gpu = &cfg.gpus[gi];
    if (!(*gpu)->present)
        return NVML_ERROR_INVALID_ARGUMENT;
    if ((*gpu)->lost)
        return NVML_ERROR_GPU_IS_LOST;
    return NVML_SUCCESS;
}

/* For queries real NVML only answers on a physical GPU (sensors, clocks,
 * utilisation, MIG mode): a MIG handle gets NOT_SUPPORTED. */
static nvmlReturn_t resolve_physical(nvmlDevice_t dev, struct fake_gpu **gpu)
{
    struct fake_mig *mig;
    nvmlReturn_t rc = resolve(dev, gpu, &mig);

    if (rc == NVML_SUCCESS && mig != NULL)
        rc = NVML_ERROR_NOT_SUPPORTED;
    return rc;
}

static nvmlReturn_t need_init(void)
{
    return init_refcount == 0 ? NVML_ERROR_UNINITIALIZED : NVML_SUCCESS;
}

static nvmlReturn_t out_u32(uint64_t v, unsigned int *out)
{
    if (out == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (v == NS)
        return NVML_ERROR_NOT_SUPPORTED;
    *out = (unsigned int)v;
    return NVML_SUCCESS;
}

static nvmlReturn_t out_str(const char *s, char *buf, unsigned int len)
{
    if (buf == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (s[0] == '\0')
        return NVML_ERROR_NOT_SUPPORTED;
    if (strlen(s) + 1 > len)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(buf, s, strlen(s) + 1);
    return NVML_SUCCESS;
}

static uint64_t sub_sat(uint64_t a, uint64_t b)
{
    return a > b ? a - b : 0;
}

/* ---- exported API -------------------------------------------------------- */

unsigned long long fake_nvml_call_count(void)
{
    return __atomic_load_n(&call_count, __ATOMIC_RELAXED);
}

static nvmlReturn_t do_init(void)
{
    enter();
    if (load_config() != 0)
        return leave(NVML_ERROR_UNKNOWN);
    if (cfg.init_error != NS && cfg.init_error != NVML_SUCCESS)
        return leave((nvmlReturn_t)cfg.init_error);
    /* NVML reference-counts init/shutdown pairs. */
    init_refcount++;
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlInit_v2(void)
{
    return do_init();
}

nvmlReturn_t nvmlInitWithFlags(unsigned int flags)
{
    (void)flags;
    return do_init();
}

nvmlReturn_t nvmlShutdown(void)
{
    enter();
    if (init_refcount == 0)
        return leave(NVML_ERROR_UNINITIALIZED);
    init_refcount--;
    return leave(NVML_SUCCESS);
}

const char *nvmlErrorString(nvmlReturn_t result)
{
    __atomic_add_fetch(&call_count, 1, __ATOMIC_RELAXED);
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case 4: return "Insufficient Permissions";
    case 5: return "Already Initialized";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case 8: return "Insufficient External Power";
    case 9: return "Driver Not Loaded";
    case 10: return "Timeout";
    case 12: return "NVML Shared Library Not Found";
    case 13: return "Function Not Found";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    case 17: return "Operating System Error";
    case 18: return "RM has detected an NVML/RM version mismatch";
    case NVML_ERROR_ARGUMENT_VERSION_MISMATCH: return "Argument version mismatch";
    default: return "Unknown Error";
    }
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length)
{
    nvmlReturn_t rc;

    enter();
    rc = need_init();
    if (rc == NVML_SUCCESS)
        rc = out_str(cfg.driver_version, version, length);
    return leave(rc);
}

nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length)
{
    /* Real NVML reports "<cuda major>.<driver version>"; nothing checks it. */
    char buf[VERSION_LEN + 8];
    nvmlReturn_t rc;

    enter();
    if (cfg.driver_version[0] != '\0' && cfg.cuda_driver_version != NS)
        snprintf(buf, sizeof(buf), "%u.%s", (unsigned int)(cfg.cuda_driver_version / 1000),
                 cfg.driver_version);
    else
        buf[0] = '\0';
    rc = out_str(buf, version, length);
    return leave(rc);
}

nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *cudaDriverVersion)
{
    unsigned int v;
    nvmlReturn_t rc;

    enter();
    rc = need_init();
    if (rc == NVML_SUCCESS)
        rc = out_u32(cfg.cuda_driver_version, &v);
    if (rc == NVML_SUCCESS && cudaDriverVersion == NULL)
        rc = NVML_ERROR_INVALID_ARGUMENT;
    if (rc == NVML_SUCCESS)
        *cudaDriverVersion = (int)v;
    return leave(rc);
}

nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *cudaDriverVersion)
{
    return nvmlSystemGetCudaDriverVersion_v2(cudaDriverVersion);
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *deviceCount)
{
    nvmlReturn_t rc;

    enter();
    rc = need_init();
    if (rc == NVML_SUCCESS && deviceCount == NULL)
        rc = NVML_ERROR_INVALID_ARGUMENT;
    /* The re-read point: tests rewrite the file between collection cycles,
     * and every cycle starts by counting devices. */
    if (rc == NVML_SUCCESS && load_config() != 0)
        rc = NVML_ERROR_UNKNOWN;
    if (rc == NVML_SUCCESS)
        *deviceCount = cfg.gpu_count;
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device)
{
    nvmlReturn_t rc;

    enter();
    rc = need_init();
    if (rc == NVML_SUCCESS && (device == NULL || index >= MAX_GPUS || !cfg.gpus[index].present))
        rc = NVML_ERROR_INVALID_ARGUMENT;
    /* Deliberately no lost check: real NVML hands out handles to GPUs that
     * have fallen off the bus and fails the queries made through them. */
    if (rc == NVML_SUCCESS)
        *device = &gpu_handles[index];
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device)
{
    nvmlReturn_t rc;
    unsigned int i, j;

    enter();
    rc = need_init();
    if (rc == NVML_SUCCESS && (uuid == NULL || device == NULL))
        rc = NVML_ERROR_INVALID_ARGUMENT;
    if (rc != NVML_SUCCESS)
        return leave(rc);
    for (i = 0; i < MAX_GPUS; i++) {
        struct fake_gpu *g = &cfg.gpus[i];

        if (!g->present)
            continue;
        if (g->uuid[0] != '\0' && strcmp(g->uuid, uuid) == 0) {
            *device = &gpu_handles[i];
            return leave(NVML_SUCCESS);
        }
        for (j = 0; j < MAX_MIGS; j++) {
            if (g->migs[j].present && g->migs[j].uuid[0] != '\0' &&
                strcmp(g->migs[j].uuid, uuid) == 0) {
                *device = &mig_handles[i][j];
                return leave(NVML_SUCCESS);
            }
        }
    }
    return leave(NVML_ERROR_NOT_FOUND);
}

nvmlReturn_t nvmlDeviceGetHandleByPciBusId_v2(const char *pciBusId, nvmlDevice_t *device)
{
    nvmlReturn_t rc;
    unsigned int i;

    enter();
    rc = need_init();
    if (rc == NVML_SUCCESS && (pciBusId == NULL || device == NULL))
        rc = NVML_ERROR_INVALID_ARGUMENT;
    if (rc != NVML_SUCCESS)
        return leave(rc);
    for (i = 0; i < MAX_GPUS; i++) {
        if (cfg.gpus[i].present && cfg.gpus[i].bus_id[0] != '\0' &&
            strcasecmp(cfg.gpus[i].bus_id, pciBusId) == 0) {
            *device = &gpu_handles[i];
            return leave(NVML_SUCCESS);
        }
    }
    return leave(NVML_ERROR_NOT_FOUND);
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length)
{
    struct fake_gpu *g;
    struct fake_mig *m;
    nvmlReturn_t rc;

    enter();
    rc = resolve(device, &g, &m);
    if (rc == NVML_SUCCESS)
        rc = out_str(m != NULL ? m->name : g->name, name, length);
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length)
{
    struct fake_gpu *g;
    struct fake_mig *m;
    nvmlReturn_t rc;

    enter();
    rc = resolve(device, &g, &m);
    if (rc == NVML_SUCCESS)
        rc = out_str(m != NULL ? m->uuid : g->uuid, uuid, length);
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index)
{
    struct fake_gpu *g;
    nvmlReturn_t rc;

    enter();
    rc = resolve_physical(device, &g);
    if (rc == NVML_SUCCESS)
        rc = out_u32(g->index, index);
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetMinorNumber(nvmlDevice_t device, unsigned int *minorNumber)
{
    struct fake_gpu *g;
    nvmlReturn_t rc;

    enter();
    rc = resolve_physical(device, &g);
    if (rc == NVML_SUCCESS)
        rc = out_u32(g->minor, minorNumber);
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t *pci)
{
    struct fake_gpu *g;
    nvmlReturn_t rc;

    enter();
    rc = resolve_physical(device, &g);
    if (rc == NVML_SUCCESS && pci == NULL)
        rc = NVML_ERROR_INVALID_ARGUMENT;
    if (rc == NVML_SUCCESS && g->bus_id[0] == '\0')
        rc = NVML_ERROR_NOT_SUPPORTED;
    if (rc == NVML_SUCCESS) {
        memset(pci, 0, sizeof(*pci));
        snprintf(pci->busId, sizeof(pci->busId), "%s", g->bus_id);
        /* The legacy field carries a 16-bit domain, as in real NVML. */
        snprintf(pci->busIdLegacy, sizeof(pci->busIdLegacy), "%04X:%02X:%02X.0",
                 g->pci_domain & 0xFFFFu, g->pci_bus & 0xFFu, g->pci_device & 0xFFu);
        pci->domain = g->pci_domain;
        pci->bus = g->pci_bus;
        pci->device = g->pci_device;
        pci->pciDeviceId = (unsigned int)g->pci_device_id;
        pci->pciSubSystemId = (unsigned int)g->pci_subsys_id;
    }
    return leave(rc);
}

/* Memory getters work on MIG handles too (a MIG device has its own memory
 * slice); mem_reserved applies only to whole GPUs. */
static nvmlReturn_t memory_of(nvmlDevice_t device, uint64_t *total, uint64_t *reserved,
                              uint64_t *used)
{
    struct fake_gpu *g;
    struct fake_mig *m;
    nvmlReturn_t rc = resolve(device, &g, &m);

    if (rc != NVML_SUCCESS)
        return rc;
    *total = m != NULL ? m->mem_total : g->mem_total;
    *used = m != NULL ? m->mem_used : g->mem_used;
    *reserved = m != NULL ? 0 : g->mem_reserved;
    if (*total == NS || *used == NS)
        return NVML_ERROR_NOT_SUPPORTED;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory)
{
    uint64_t total, reserved, used;
    nvmlReturn_t rc;

    enter();
    rc = memory_of(device, &total, &reserved, &used);
    if (rc == NVML_SUCCESS && memory == NULL)
        rc = NVML_ERROR_INVALID_ARGUMENT;
    /* Real NVML rejects a caller compiled against another struct version. */
    if (rc == NVML_SUCCESS && memory->version != NVML_MEMORY_V2)
        rc = NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    if (rc == NVML_SUCCESS) {
        memory->total = total;
        memory->reserved = reserved;
        memory->used = used;
        memory->free = sub_sat(sub_sat(total, reserved), used);
    }
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory)
{
    uint64_t total, reserved, used;
    nvmlReturn_t rc;

    enter();
    rc = memory_of(device, &total, &reserved, &used);
    if (rc == NVML_SUCCESS && memory == NULL)
        rc = NVML_ERROR_INVALID_ARGUMENT;
    if (rc == NVML_SUCCESS) {
        /* The v1 struct has no reserved field; NVML folds it into used. */
        memory->total = total;
        memory->used = used + reserved;
        memory->free = sub_sat(total, used + reserved);
    }
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device,
                                                  nvmlUtilization_t *utilization)
{
    struct fake_gpu *g;
    nvmlReturn_t rc;

    enter();
    rc = resolve_physical(device, &g);
    if (rc == NVML_SUCCESS && utilization == NULL)
        rc = NVML_ERROR_INVALID_ARGUMENT;
    if (rc == NVML_SUCCESS && (g->util_gpu == NS || g->util_mem == NS))
        rc = NVML_ERROR_NOT_SUPPORTED;
    if (rc == NVML_SUCCESS) {
        utilization->gpu = (unsigned int)g->util_gpu;
        utilization->memory = (unsigned int)g->util_mem;
    }
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device, unsigned int sensorType,
                                             unsigned int *temp)
{
    struct fake_gpu *g;
    nvmlReturn_t rc;

    enter();
    rc = resolve_physical(device, &g);
    if (rc == NVML_SUCCESS && sensorType != NVML_TEMPERATURE_GPU)
        rc = NVML_ERROR_INVALID_ARGUMENT;
    if (rc == NVML_SUCCESS)
        rc = out_u32(g->temp, temp);
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned int *power)
{
    struct fake_gpu *g;
    nvmlReturn_t rc;

    enter();
    rc = resolve_physical(device, &g);
    if (rc == NVML_SUCCESS)
        rc = out_u32(g->power_mw, power);
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetTotalEnergyConsumption(nvmlDevice_t device,
                                                        unsigned long long *energy)
{
    struct fake_gpu *g;
    nvmlReturn_t rc;

    enter();
    rc = resolve_physical(device, &g);
    if (rc == NVML_SUCCESS && energy == NULL)
        rc = NVML_ERROR_INVALID_ARGUMENT;
    if (rc == NVML_SUCCESS && g->energy_mj == NS)
        rc = NVML_ERROR_NOT_SUPPORTED;
    if (rc == NVML_SUCCESS)
        *energy = g->energy_mj;
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetClockInfo(nvmlDevice_t device, unsigned int type,
                                           unsigned int *clock)
{
    struct fake_gpu *g;
    nvmlReturn_t rc;

    enter();
    rc = resolve_physical(device, &g);
    if (rc != NVML_SUCCESS)
        return leave(rc);
    switch (type) {
    /* Graphics and SM share one clock domain on datacenter parts. */
    case NVML_CLOCK_GRAPHICS:
    case NVML_CLOCK_SM:
        rc = out_u32(g->sm_clock, clock);
        break;
    case NVML_CLOCK_MEM:
        rc = out_u32(g->mem_clock, clock);
        break;
    case NVML_CLOCK_VIDEO:
        rc = NVML_ERROR_NOT_SUPPORTED;
        break;
    default:
        rc = NVML_ERROR_INVALID_ARGUMENT;
    }
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t device, unsigned int *currentMode,
                                         unsigned int *pendingMode)
{
    struct fake_gpu *g;
    nvmlReturn_t rc;

    enter();
    rc = resolve_physical(device, &g);
    if (rc == NVML_SUCCESS && (currentMode == NULL || pendingMode == NULL))
        rc = NVML_ERROR_INVALID_ARGUMENT;
    if (rc == NVML_SUCCESS && (g->mig_current == NS || g->mig_pending == NS))
        rc = NVML_ERROR_NOT_SUPPORTED;
    if (rc == NVML_SUCCESS) {
        *currentMode = (unsigned int)g->mig_current;
        *pendingMode = (unsigned int)g->mig_pending;
    }
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetMaxMigDeviceCount(nvmlDevice_t device, unsigned int *count)
{
    struct fake_gpu *g;
    nvmlReturn_t rc;

    enter();
    rc = resolve_physical(device, &g);
    if (rc == NVML_SUCCESS)
        rc = out_u32(g->max_mig, count);
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetMigDeviceHandleByIndex(nvmlDevice_t device, unsigned int index,
                                                        nvmlDevice_t *migDevice)
{
    struct fake_gpu *g;
    struct fake_mig *m;
    nvmlReturn_t rc;

    enter();
    rc = resolve(device, &g, &m);
    if (rc == NVML_SUCCESS && (m != NULL || migDevice == NULL))
        rc = NVML_ERROR_INVALID_ARGUMENT;
    /* Indices past max_mig are still NOT_FOUND rather than INVALID_ARGUMENT,
     * which is what callers probing 0..max see on real hardware. */
    if (rc == NVML_SUCCESS && (index >= MAX_MIGS || !g->migs[index].present))
        rc = NVML_ERROR_NOT_FOUND;
    if (rc == NVML_SUCCESS)
        *migDevice = &mig_handles[g->index][index];
    return leave(rc);
}

nvmlReturn_t nvmlDeviceIsMigDeviceHandle(nvmlDevice_t device, unsigned int *isMigDevice)
{
    struct fake_gpu *g;
    struct fake_mig *m;
    nvmlReturn_t rc;

    enter();
    rc = resolve(device, &g, &m);
    if (rc == NVML_SUCCESS)
        rc = out_u32(m != NULL, isMigDevice);
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetDeviceHandleFromMigDeviceHandle(nvmlDevice_t migDevice,
                                                                 nvmlDevice_t *device)
{
    struct fake_gpu *g;
    struct fake_mig *m;
    nvmlReturn_t rc;

    enter();
    rc = resolve(migDevice, &g, &m);
    if (rc == NVML_SUCCESS && (m == NULL || device == NULL))
        rc = NVML_ERROR_INVALID_ARGUMENT;
    if (rc == NVML_SUCCESS)
        *device = &gpu_handles[g->index];
    return leave(rc);
}

static nvmlReturn_t mig_instance_id(nvmlDevice_t device, int want_ci, unsigned int *id)
{
    struct fake_gpu *g;
    struct fake_mig *m;
    nvmlReturn_t rc;

    enter();
    rc = resolve(device, &g, &m);
    if (rc == NVML_SUCCESS && m == NULL)
        rc = NVML_ERROR_INVALID_ARGUMENT;
    if (rc == NVML_SUCCESS)
        rc = out_u32(want_ci ? m->ci : m->gi, id);
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetGpuInstanceId(nvmlDevice_t device, unsigned int *id)
{
    return mig_instance_id(device, 0, id);
}

nvmlReturn_t nvmlDeviceGetComputeInstanceId(nvmlDevice_t device, unsigned int *id)
{
    return mig_instance_id(device, 1, id);
}

/*
 * A whole-GPU handle lists every process on the GPU; a MIG handle lists those
 * whose gi/ci match the MIG device, as real NVML scopes them.  Sizing follows
 * NVML: too small a buffer (including a NULL one with *infoCount 0) gets
 * INSUFFICIENT_SIZE with the needed count, and no processes is SUCCESS with 0.
 */
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device,
                                                            unsigned int *infoCount,
                                                            nvmlProcessInfo_t *infos)
{
    struct fake_gpu *g;
    struct fake_mig *m;
    const struct fake_proc *sel[MAX_PROCS];
    unsigned int i, n = 0;
    nvmlReturn_t rc;

    enter();
    rc = resolve(device, &g, &m);
    if (rc == NVML_SUCCESS && infoCount == NULL)
        rc = NVML_ERROR_INVALID_ARGUMENT;
    if (rc != NVML_SUCCESS)
        return leave(rc);

    for (i = 0; i < g->nprocs; i++) {
        const struct fake_proc *p = &g->procs[i];

        if (m == NULL || (m->gi != NS && m->ci != NS && p->gi == m->gi && p->ci == m->ci))
            sel[n++] = p;
    }
    if (n == 0) {
        *infoCount = 0;
        return leave(NVML_SUCCESS);
    }
    if (*infoCount < n) {
        *infoCount = n;
        return leave(NVML_ERROR_INSUFFICIENT_SIZE);
    }
    if (infos == NULL)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    for (i = 0; i < n; i++) {
        infos[i].pid = (unsigned int)sel[i]->pid;
        infos[i].usedGpuMemory =
            sel[i]->used_mem == NS ? NVML_VALUE_NOT_AVAILABLE_ULL : sel[i]->used_mem;
        infos[i].gpuInstanceId = sel[i]->gi == NS ? NVML_NO_INSTANCE_ID : (unsigned int)sel[i]->gi;
        infos[i].computeInstanceId =
            sel[i]->ci == NS ? NVML_NO_INSTANCE_ID : (unsigned int)sel[i]->ci;
    }
    *infoCount = n;
    return leave(NVML_SUCCESS);
}

/* Graphics contexts never exist on the headless GPUs this fake models. */
nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v3(nvmlDevice_t device,
                                                             unsigned int *infoCount,
                                                             nvmlProcessInfo_t *infos)
{
    struct fake_gpu *g;
    struct fake_mig *m;
    nvmlReturn_t rc;

    (void)infos;
    enter();
    rc = resolve(device, &g, &m);
    if (rc == NVML_SUCCESS && infoCount == NULL)
        rc = NVML_ERROR_INVALID_ARGUMENT;
    if (rc == NVML_SUCCESS)
        *infoCount = 0;
    return leave(rc);
}

/* ---- GPU Performance Monitoring ------------------------------------------ */

/*
 * A sample is a snapshot of one GPU's or GPU instance's busy counter; the
 * graphics-util metric between two samples is the busy share of the time
 * between them.  Samples are heap objects with a magic number so that a
 * foreign or freed pointer is refused rather than read.
 */
#define SAMPLE_MAGIC 0x6770u

struct fake_gpm_sample {
    unsigned int magic;
    int filled;
    unsigned int gpu, slot; /* slot MAX_MIGS: the whole GPU */
    uint64_t t_ns, active_ns;
};

static int sample_ok(const struct fake_gpm_sample *s)
{
    return s != NULL && s->magic == SAMPLE_MAGIC;
}

nvmlReturn_t nvmlGpmSampleAlloc(nvmlGpmSample_t *sample)
{
    struct fake_gpm_sample *s;
    nvmlReturn_t rc;

    enter();
    rc = need_init();
    if (rc == NVML_SUCCESS && sample == NULL)
        rc = NVML_ERROR_INVALID_ARGUMENT;
    if (rc == NVML_SUCCESS) {
        s = calloc(1, sizeof(*s));
        if (s == NULL)
            return leave(NVML_ERROR_UNKNOWN);
        s->magic = SAMPLE_MAGIC;
        *sample = s;
    }
    return leave(rc);
}

nvmlReturn_t nvmlGpmSampleFree(nvmlGpmSample_t sample)
{
    enter();
    if (!sample_ok(sample))
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    sample->magic = 0;
    free(sample);
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlGpmQueryDeviceSupport(nvmlDevice_t device, nvmlGpmSupport_t *support)
{
    struct fake_gpu *g;
    nvmlReturn_t rc;

    enter();
    rc = resolve_physical(device, &g);
    if (rc == NVML_SUCCESS && support == NULL)
        rc = NVML_ERROR_INVALID_ARGUMENT;
    if (rc == NVML_SUCCESS && support->version != NVML_GPM_SUPPORT_VERSION)
        rc = NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    if (rc == NVML_SUCCESS)
        support->isSupportedDevice = g->gpm == 1;
    return leave(rc);
}

static nvmlReturn_t fill_sample(nvmlDevice_t device, int whole, unsigned int gi,
                                nvmlGpmSample_t sample)
{
    struct fake_gpu *g;
    unsigned int gpu, slot = MAX_MIGS;
    uint64_t now;
    nvmlReturn_t rc = resolve_physical(device, &g);

    if (rc != NVML_SUCCESS)
        return rc;
    if (!sample_ok(sample))
        return NVML_ERROR_INVALID_ARGUMENT;
    if (g->gpm != 1)
        return NVML_ERROR_NOT_SUPPORTED;
    gpu = (unsigned int)(g - cfg.gpus);
    if (!whole) {
        /* Per GPU instance: the GPU must be in MIG mode and have that instance. */
        if (g->mig_current != 1)
            return NVML_ERROR_NOT_SUPPORTED;
        for (slot = 0; slot < MAX_MIGS; slot++)
            if (g->migs[slot].present && g->migs[slot].gi == gi)
                break;
        if (slot == MAX_MIGS)
            return NVML_ERROR_INVALID_ARGUMENT;
    }
    now = mono_ns();
    gpm_advance(gpu, slot, now);
    sample->filled = 1;
    sample->gpu = gpu;
    sample->slot = slot;
    sample->t_ns = now;
    sample->active_ns = gpm_counters[gpu][slot].active_ns;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlGpmSampleGet(nvmlDevice_t device, nvmlGpmSample_t gpmSample)
{
    enter();
    return leave(fill_sample(device, 1, 0, gpmSample));
}

nvmlReturn_t nvmlGpmMigSampleGet(nvmlDevice_t device, unsigned int gpuInstanceId,
                                 nvmlGpmSample_t gpmSample)
{
    enter();
    return leave(fill_sample(device, 0, gpuInstanceId, gpmSample));
}

static char gr_short[] = "gr_util";
static char gr_long[] = "graphics engine utilization";
static char gr_unit[] = "%";

nvmlReturn_t nvmlGpmMetricsGet(nvmlGpmMetricsGet_t *req)
{
    const struct fake_gpm_sample *a, *b;
    unsigned int i;
    nvmlReturn_t rc;

    enter();
    rc = need_init();
    if (rc != NVML_SUCCESS)
        return leave(rc);
    if (req == NULL || req->numMetrics > NVML_GPM_METRIC_MAX)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    if (req->version != NVML_GPM_METRICS_GET_VERSION)
        return leave(NVML_ERROR_ARGUMENT_VERSION_MISMATCH);
    a = req->sample1;
    b = req->sample2;
    /* Two filled samples of the same device, the second taken later. */
    if (!sample_ok(a) || !sample_ok(b) || !a->filled || !b->filled || a->gpu != b->gpu ||
        a->slot != b->slot || b->t_ns <= a->t_ns)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    for (i = 0; i < req->numMetrics; i++) {
        nvmlGpmMetric_t *m = &req->metrics[i];

        memset(&m->metricInfo, 0, sizeof(m->metricInfo));
        if (m->metricId != NVML_GPM_METRIC_GRAPHICS_UTIL) {
            m->nvmlReturn = NVML_ERROR_NOT_SUPPORTED;
            m->value = 0;
            continue;
        }
        m->nvmlReturn = NVML_SUCCESS;
        m->value = 100.0 * (double)(b->active_ns - a->active_ns) / (double)(b->t_ns - a->t_ns);
        m->metricInfo.shortName = gr_short;
        m->metricInfo.longName = gr_long;
        m->metricInfo.unit = gr_unit;
    }
    return leave(NVML_SUCCESS);
}
