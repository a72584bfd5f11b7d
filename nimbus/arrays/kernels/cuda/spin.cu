// Benchmark helper; source: cuda.source("spin_kernel").
// Thread mapping: one thread; busy-waits `cycles` clock ticks (keeps the device busy
// while the host queues the calls a benchmark times).
extern "C" __global__ void spin_kernel(long long cycles) {
    const long long t0 = clock64();
    while (clock64() - t0 < cycles) { }
}
