/* A stand-in for libedgetpu.so.1 at the hardware boundary: the same plugin ABI that tflite's load_delegate()
 * calls (tflite_plugin_create_delegate / tflite_plugin_destroy_delegate), with the USB/PCIe device replaced by
 * the FAKE_EDGETPU_DEVICES environment variable ("usb:0,usb:1,pci:0"; empty = no TPU plugged in).
 * Options passed by the caller are appended to FAKE_EDGETPU_LOG as key=value lines.
 * The delegate it returns claims no nodes, so the interpreter runs the model on CPU: results must equal CPU. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
  void *data_;
  int (*Prepare)(void *context, void *delegate);
  void *CopyFromBufferHandle, *CopyToBufferHandle, *FreeBufferHandle;
  long long flags;
  void *opaque_delegate_builder;
  void *reserved[8];
} FakeDelegate;

static int prepare(void *context, void *delegate) { (void)context; (void)delegate; return 0; }

static int listed(const char *devices, const char *want) {
  if (!devices || !*devices) return 0;
  if (!want) return 1;                       /* no device option: any TPU will do */
  size_t n = strlen(want);
  const char *p = devices;
  while (*p) {
    const char *end = strchr(p, ',');
    size_t len = end ? (size_t)(end - p) : strlen(p);
    /* "usb" matches any usb:N, "usb:1" only itself */
    if ((len == n && strncmp(p, want, n) == 0) || (strchr(want, ':') == NULL && strncmp(p, want, n) == 0 && p[n] == ':'))
      return 1;
    if (!end) break;
    p = end + 1;
  }
  return 0;
}

void *tflite_plugin_create_delegate(char **keys, char **values, int n, void (*report)(const char *)) {
  const char *log = getenv("FAKE_EDGETPU_LOG");
  const char *want = NULL;
  FILE *f = log ? fopen(log, "a") : NULL;
  for (int i = 0; i < n; i++) {
    if (f) fprintf(f, "%s=%s\n", keys[i], values[i]);
    if (strcmp(keys[i], "device") == 0) want = values[i];
  }
  if (f) { fprintf(f, "--\n"); fclose(f); }
  if (!listed(getenv("FAKE_EDGETPU_DEVICES"), want)) {
    if (report) report("Failed to open EdgeTPU device");
    return NULL;
  }
  FakeDelegate *d = calloc(1, sizeof(FakeDelegate));
  d->Prepare = prepare;
  return d;
}

void tflite_plugin_destroy_delegate(void *d) { free(d); }
