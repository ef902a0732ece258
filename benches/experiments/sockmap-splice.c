// sockmap-splice: a measurement prototype, not product code (docs/design/0007,
// "In-kernel splicing, measured").
//
// A TCP proxy that forwards nothing itself: each accepted client socket and
// its backend socket go into a SOCKHASH map with an sk_skb verdict program
// that redirects every received skb to the partner socket's egress, so the
// kernel moves the bytes and the process only accepts, connects and closes.
// It answers one question: does in-kernel forwarding use less CPU per
// request than a copying proxy on this kernel?
//
// Build and run (root or CAP_BPF + CAP_NET_ADMIN), backend fixed at
// 127.0.0.2:18081, listening on 127.0.0.1:<port>:
//   gcc -O2 -D_GNU_SOURCE -o /tmp/sockmap-splice benches/experiments/sockmap-splice.c
//   /tmp/sockmap-splice 20080 &
//   wrk -t1 -c64 -d5s http://127.0.0.1:20080/
//
// Known shortcuts: blocking connect, no half-close (either side's FIN
// closes both), fixed-size tables indexed by descriptor.
#include <linux/bpf.h>
#include <sys/syscall.h>
#include <sys/socket.h>
#include <sys/epoll.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <unistd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <stdint.h>

static long bpf(int cmd, union bpf_attr *a) { return syscall(__NR_bpf, cmd, a, sizeof(*a)); }
static int map_create(int type, int ks, int vs, int max) {
  union bpf_attr a; memset(&a, 0, sizeof a);
  a.map_type = type; a.key_size = ks; a.value_size = vs; a.max_entries = max;
  int fd = bpf(BPF_MAP_CREATE, &a); if (fd < 0) { perror("map_create"); exit(1);} return fd;
}
static int map_update(int fd, void *k, void *v) {
  union bpf_attr a; memset(&a, 0, sizeof a);
  a.map_fd = fd; a.key = (uint64_t)k; a.value = (uint64_t)v; a.flags = BPF_ANY;
  return bpf(BPF_MAP_UPDATE_ELEM, &a);
}
static int map_delete(int fd, void *k) {
  union bpf_attr a; memset(&a, 0, sizeof a);
  a.map_fd = fd; a.key = (uint64_t)k; return bpf(BPF_MAP_DELETE_ELEM, &a);
}
#define I(c,d,s,o,i) ((struct bpf_insn){c,d,s,o,i})
int peers[65536]; uint64_t cookies[65536];
int main(int argc, char **argv) {
  int socks = map_create(BPF_MAP_TYPE_SOCKHASH, 8, 8, 65536);
  int peer = map_create(BPF_MAP_TYPE_HASH, 8, 8, 65536);
  // r0 = cookie(skb's socket); p = peer[cookie]; no partner yet: SK_PASS;
  // else return bpf_sk_redirect_hash(skb, socks, &p, 0) (to p's egress).
  struct bpf_insn prog[] = {
    I(BPF_ALU64|BPF_MOV|BPF_X, 6, 1, 0, 0),             // r6 = ctx
    I(BPF_JMP|BPF_CALL, 0, 0, 0, BPF_FUNC_get_socket_cookie),
    I(BPF_STX|BPF_MEM|BPF_DW, 10, 0, -8, 0),            // *(r10-8) = cookie
    I(BPF_ALU64|BPF_MOV|BPF_X, 2, 10, 0, 0),
    I(BPF_ALU64|BPF_ADD|BPF_K, 2, 0, 0, -8),
    I(BPF_LD|BPF_DW|BPF_IMM, 1, BPF_PSEUDO_MAP_FD, 0, peer), I(0,0,0,0,0),
    I(BPF_JMP|BPF_CALL, 0, 0, 0, BPF_FUNC_map_lookup_elem),
    I(BPF_JMP|BPF_JEQ|BPF_K, 0, 0, 10, 0),               // if r0 == 0 goto pass
    I(BPF_LDX|BPF_MEM|BPF_DW, 1, 0, 0, 0),              // r1 = *r0
    I(BPF_STX|BPF_MEM|BPF_DW, 10, 1, -16, 0),
    I(BPF_ALU64|BPF_MOV|BPF_X, 3, 10, 0, 0),
    I(BPF_ALU64|BPF_ADD|BPF_K, 3, 0, 0, -16),
    I(BPF_ALU64|BPF_MOV|BPF_X, 1, 6, 0, 0),
    I(BPF_LD|BPF_DW|BPF_IMM, 2, BPF_PSEUDO_MAP_FD, 0, socks), I(0,0,0,0,0),
    I(BPF_ALU64|BPF_MOV|BPF_K, 4, 0, 0, 0),
    I(BPF_JMP|BPF_CALL, 0, 0, 0, BPF_FUNC_sk_redirect_hash),
    I(BPF_JMP|BPF_EXIT, 0, 0, 0, 0),
    I(BPF_ALU64|BPF_MOV|BPF_K, 0, 0, 0, SK_PASS),       // pass:
    I(BPF_JMP|BPF_EXIT, 0, 0, 0, 0),
  };
  static char log[65536];
  union bpf_attr a; memset(&a, 0, sizeof a);
  a.prog_type = BPF_PROG_TYPE_SK_SKB; a.insns = (uint64_t)prog; a.insn_cnt = sizeof prog / sizeof prog[0];
  a.license = (uint64_t)"GPL"; a.log_buf = (uint64_t)log; a.log_size = sizeof log; a.log_level = 1;
  int pfd = bpf(BPF_PROG_LOAD, &a);
  if (pfd < 0) { perror("prog_load"); fprintf(stderr, "%s\n", log); return 1; }
  memset(&a, 0, sizeof a); a.target_fd = socks; a.attach_bpf_fd = pfd; a.attach_type = BPF_SK_SKB_VERDICT;
  if (bpf(BPF_PROG_ATTACH, &a) < 0) { perror("attach"); return 1; }

  int port = argc > 1 ? atoi(argv[1]) : 20090;
  int l = socket(AF_INET, SOCK_STREAM, 0); int one = 1;
  setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(port) }; inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
  if (bind(l, (void*)&sa, sizeof sa) || listen(l, 4096)) { perror("listen"); return 1; }
  struct sockaddr_in be = { .sin_family = AF_INET, .sin_port = htons(18081) }; inet_pton(AF_INET, "127.0.0.2", &be.sin_addr);
  int ep = epoll_create1(0);
  struct epoll_event ev = { .events = EPOLLIN, .data.fd = l }; epoll_ctl(ep, EPOLL_CTL_ADD, l, &ev);
  struct epoll_event evs[256];
  for (;;) {
    int n = epoll_wait(ep, evs, 256, -1);
    for (int i = 0; i < n; i++) {
      int fd = evs[i].data.fd;
      if (fd == l) {
        for (;;) {
          int c = accept4(l, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK); if (c < 0) break;
          int b = socket(AF_INET, SOCK_STREAM, 0);
          if (connect(b, (void*)&be, sizeof be)) { perror("connect"); close(c); close(b); continue; }
          setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one); setsockopt(b, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
          uint64_t cc, bc; socklen_t sl = 8;
          getsockopt(c, SOL_SOCKET, SO_COOKIE, &cc, &sl); getsockopt(b, SOL_SOCKET, SO_COOKIE, &bc, &sl);
          uint64_t cfd = c, bfd = b;
          if (map_update(socks, &cc, &cfd) || map_update(socks, &bc, &bfd)) { uint64_t k=cc; map_delete(socks,&k); k=bc; map_delete(socks,&k); close(c); close(b); continue; }
          map_update(peer, &cc, &bc); map_update(peer, &bc, &cc);
          peers[c] = b; peers[b] = c; cookies[c] = cc; cookies[b] = bc;
          setsockopt(c, SOL_SOCKET, SO_RCVLOWAT, &one, sizeof one); // kick: process data queued before insertion
          ev.events = EPOLLRDHUP; ev.data.fd = c; epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev);
          ev.data.fd = b; epoll_ctl(ep, EPOLL_CTL_ADD, b, &ev);
        }
      } else {
        int p = peers[fd]; if (p < 0) continue;
        map_delete(peer, &cookies[fd]); map_delete(peer, &cookies[p]);
        peers[fd] = peers[p] = -1; close(fd); close(p);
      }
    }
  }
}
