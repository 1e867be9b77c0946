// Command hetmoe-k8s bundles the upstream Kubernetes control-plane components
// and etcd into one binary so the test harness needs a single cached build.
//
// The first argument selects the component; every component still runs as its
// own process because the upstream commands share global registries.
package main

import (
	"fmt"
	"os"
	_ "time/tzdata" // CronJob time-zone support, as upstream imports it

	"github.com/spf13/cobra"
	"go.etcd.io/etcd/server/v3/etcdmain"
	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"          // JSON log format
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // client-go metrics
	_ "k8s.io/component-base/metrics/prometheus/version"  // version metric
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
)

// kubeCommands maps a sub-command name to the upstream cobra constructor.
var kubeCommands = map[string]func() *cobra.Command{
	"kube-apiserver": apiserver.NewAPIServerCommand,
	"kube-controller-manager": func() *cobra.Command {
		return controllermanager.NewControllerManagerCommand()
	},
	"kube-scheduler": func() *cobra.Command {
		return scheduler.NewSchedulerCommand()
	},
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: hetmoe-k8s {etcd|kube-apiserver|kube-controller-manager|kube-scheduler} [flags...]")
}

func main() {
	if len(os.Args) < 2 {
		usage()
		os.Exit(2)
	}
	name, rest := os.Args[1], os.Args[2:]
	if name == "etcd" {
		// etcdmain.Main expects argv[0] followed by etcd's own flags.
		etcdmain.Main(append([]string{"etcd"}, rest...))
		return
	}
	newCommand, ok := kubeCommands[name]
	if !ok {
		usage()
		os.Exit(2)
	}
	command := newCommand()
	command.SetArgs(rest)
	os.Exit(cli.Run(command))
}
