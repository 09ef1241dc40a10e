#!/bin/sh
# In-VM part of bench-xfrm.sh: run the xfrm benchmark in a kernel with ESP (policies and SAs
# on both sides). Peer counts from the kernel command line (`bench.peers=1000,5000`; default:
# the bench's own list). Prints the bench lines, the guest's memory before and after, and
# "VM-RESULT: PASS" when it completed.
peers=$(tr ' ' '\n' </proc/cmdline | sed -n 's/^bench\.peers=//p')
mem() { grep -E '^(MemTotal|MemAvailable|Slab):' /proc/meminfo | tr -s ' ' | tr '\n' ' '; echo; }
echo "guest memory before: $(mem)"
/usr/bin/xfrm-bench --bench --with-sas ${peers:+--peers=$peers} ||
    { rc=$?; echo "guest memory at the failure: $(mem)"; echo "VM-RESULT: FAIL (bench exited $rc)"; exit 1; }
echo "guest memory after: $(mem)"
echo "VM-RESULT: PASS"
