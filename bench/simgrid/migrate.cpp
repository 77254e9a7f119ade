// SimGrid's live-migration model (Hirofuchi et al. 2013; SimGrid's vm live_migration plugin) on the
// parameters LiveMig's simulator takes, for bench/simgrid/run.sh: N VMs of RAM MiB on host src,
// each computing (so its dirty page tracking sees work: dirty bytes per second = intensity x
// migration speed, capped by the working set), migrated to host dst over one link, one after
// another (sequential) or all at once (concurrent). Prints one line of key=value figures.
//
//   migrate --count N --mode sequential|concurrent --ram-mib 2048 --link-bps 125000000
//           --latency-s 0.0001 --intensity 0.1 --working-set-mib 1843 [SimGrid --cfg/--log options]
#include <simgrid/s4u.hpp>
#include <simgrid/plugins/live_migration.h>
#include <simgrid/vm.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

namespace sg4 = simgrid::s4u;

namespace {
struct Params {
  int count = 1;
  bool concurrent = false;
  int ram_mib = 2048;
  double link_bps = 125e6;
  double latency_s = 1e-4;
  double intensity = 0;
  double working_set_mib = -1; // default: 90% of RAM, as sg_vm_create_migratable
};

Params params;
std::vector<double> totals;
int completed = 0;

long peak_rss_kib()
{
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmHWM:", 0) == 0)
      return std::atol(line.c_str() + 6);
  return 0;
}

// Keeps the VM's vCPU busy: its computed flops are what the plugin turns into dirty bytes. In
// executions of 1e12 flops (1,000 s each): the plugin counts a difference of remaining flops, which a
// single huge execution would lose to rounding.
void compute()
{
  while (true)
    sg4::this_actor::execute(1e12);
}

void migrate_one(sg4::VirtualMachine* vm, sg4::Host* dst)
{
  double start = sg4::Engine::get_clock();
  sg_vm_migrate(vm, dst);
  totals.push_back(sg4::Engine::get_clock() - start);
  completed++;
}

void sequential(std::vector<sg4::VirtualMachine*> vms, sg4::Host* dst)
{
  for (auto* vm : vms)
    migrate_one(vm, dst);
}
} // namespace

int main(int argc, char** argv)
{
  sg4::Engine e(&argc, argv); // takes SimGrid's own --cfg and --log options out of argv
  for (int i = 1; i < argc; i++) {
    std::string a = argv[i];
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) { std::fprintf(stderr, "migrate: %s needs a value\n", a.c_str()); std::exit(2); }
      return argv[++i];
    };
    if (a == "--count") params.count = std::atoi(next());
    else if (a == "--mode") params.concurrent = std::strcmp(next(), "concurrent") == 0;
    else if (a == "--ram-mib") params.ram_mib = std::atoi(next());
    else if (a == "--link-bps") params.link_bps = std::atof(next());
    else if (a == "--latency-s") params.latency_s = std::atof(next());
    else if (a == "--intensity") params.intensity = std::atof(next());
    else if (a == "--working-set-mib") params.working_set_mib = std::atof(next());
    else { std::fprintf(stderr, "migrate: unknown option %s\n", a.c_str()); return 2; }
  }
  if (params.count < 1 || params.ram_mib < 1 || params.link_bps <= 0) { std::fprintf(stderr, "migrate: bad parameters\n"); return 2; }

  auto* zone = sg4::create_full_zone("zone");
  const double flops = 1e9;
  auto* src = zone->create_host("src", flops)->set_core_count(params.count)->seal();
  auto* dst = zone->create_host("dst", flops)->set_core_count(params.count)->seal();
  auto* link = zone->create_link("link", params.link_bps)->set_latency(params.latency_s)->seal();
  zone->add_route(src->get_netpoint(), dst->get_netpoint(), nullptr, nullptr, {sg4::LinkInRoute(link)}, true);
  zone->seal();
  sg_vm_live_migration_plugin_init();

  std::vector<sg4::VirtualMachine*> vms;
  for (int i = 0; i < params.count; i++) {
    // The migration speed is the link's (MiB/s): the plugin's dirty rate is intensity x that speed.
    auto* vm = sg_vm_create_migratable(src, ("vm" + std::to_string(i)).c_str(), 1, params.ram_mib,
                                       static_cast<int>(params.link_bps / 1048576.0), static_cast<int>(params.intensity * 100 + 0.5));
    sg_vm_set_migration_speed(vm, params.link_bps); // exact (the call above takes whole MiB/s)
    if (params.working_set_mib >= 0)
      sg_vm_set_working_set_memory(vm, static_cast<sg_size_t>(params.working_set_mib * 1048576.0));
    vm->start();
    sg4::Actor::create("work" + std::to_string(i), vm, compute)->daemonize();
    vms.push_back(vm);
  }
  if (params.concurrent)
    for (auto* vm : vms)
      sg4::Actor::create("mig" + std::string(vm->get_cname()), src, migrate_one, vm, dst);
  else
    sg4::Actor::create("mig", src, sequential, vms, dst);

  auto wall0 = std::chrono::steady_clock::now();
  e.run();
  double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - wall0).count();
  double sum = 0;
  for (double t : totals) sum += t;
  std::printf("mode=%s count=%d ram_mib=%d link_bps=%.0f intensity=%.3f completed=%d mean_total_s=%.4f first_total_s=%.4f virtual_s=%.3f wall_s=%.3f per_wall_s=%.0f peak_rss_kib=%ld\n",
              params.concurrent ? "concurrent" : "sequential", params.count, params.ram_mib, params.link_bps, params.intensity,
              completed, totals.empty() ? 0 : sum / totals.size(), totals.empty() ? 0 : totals[0], sg4::Engine::get_clock(), wall,
              params.count / wall, peak_rss_kib());
  return 0;
}
