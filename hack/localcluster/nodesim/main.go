// Command nodesim stands in for the kubelet and the node-lifecycle controller
// of the local cluster (hack/local-cluster.sh), which has neither: there is no
// kubelet, and no kube-controller-manager.
//
//	nodesim heartbeat    --node N [--address IP]  create Node N and post Ready=True every --interval (the kubelet's job)
//	nodesim lifecycle    [--grace 40s]            mark Ready=Unknown on Nodes whose heartbeat is older than --grace (the node-lifecycle controller's job)
//	nodesim mark-unknown --node N                 mark Ready=Unknown once, now (what the lifecycle controller would do after the grace period)
//
// The local cluster runs each node's heartbeat inside that node's network
// namespace, so cutting the node's link also stops its heartbeats, as it
// would for a real kubelet; the lifecycle loop runs beside the API server.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/util/retry"
)

// LabelLocalCluster marks the Nodes this program manages.
const LabelLocalCluster = "tandem.dev/local-cluster"

func main() {
	if len(os.Args) < 2 || os.Args[1] == "-h" || os.Args[1] == "--help" || os.Args[1] == "help" {
		usage()
		if len(os.Args) < 2 {
			os.Exit(2)
		}
		return
	}
	verb := os.Args[1]
	fs := flag.NewFlagSet("nodesim "+verb, flag.ExitOnError)
	kubeconfig := fs.String("kubeconfig", os.Getenv("KUBECONFIG"), "Kubeconfig file.")
	node := fs.String("node", "", "Node name.")
	address := fs.String("address", "", "The Node's InternalIP (heartbeat).")
	interval := fs.Duration("interval", 5*time.Second, "Heartbeat or check period.")
	grace := fs.Duration("grace", 40*time.Second, "Heartbeat age after which a Node is marked Unknown (lifecycle; Kubernetes' node-monitor-grace-period).")
	_ = fs.Parse(os.Args[2:])

	if err := run(verb, *kubeconfig, *node, *address, *interval, *grace); err != nil {
		fmt.Fprintf(os.Stderr, "nodesim %s: %v\n", verb, err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprint(os.Stderr, `Usage: nodesim heartbeat|lifecycle|mark-unknown [flags]
  heartbeat    --node N [--address IP] [--interval 5s]   create Node N, post Ready=True every interval
  lifecycle    [--grace 40s] [--interval 5s]             mark Nodes with stale heartbeats Ready=Unknown
  mark-unknown --node N                                   mark Node N Ready=Unknown now
Common: --kubeconfig FILE (default $KUBECONFIG)
`)
}

func run(verb, kubeconfig, node, address string, interval, grace time.Duration) error {
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return fmt.Errorf("kubeconfig: %w", err)
	}
	cfg.Timeout = 5 * time.Second
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	switch verb {
	case "heartbeat":
		if node == "" {
			return errors.New("--node is required")
		}
		return heartbeat(ctx, cs, node, address, interval)
	case "lifecycle":
		return lifecycle(ctx, cs, interval, grace)
	case "mark-unknown":
		if node == "" {
			return errors.New("--node is required")
		}
		return setReady(ctx, cs, node, corev1.ConditionUnknown, "NodeStatusUnknown", "Kubelet stopped posting node status.")
	}
	usage()
	return fmt.Errorf("unknown verb %q", verb)
}

func heartbeat(ctx context.Context, cs kubernetes.Interface, node, address string, interval time.Duration) error {
	failing := false
	for {
		err := beat(ctx, cs, node, address)
		switch {
		case err != nil && !failing:
			fmt.Fprintf(os.Stderr, "%s heartbeat of %s failed (retrying every %v): %v\n", now(), node, interval, err)
			failing = true
		case err == nil && failing:
			fmt.Fprintf(os.Stderr, "%s heartbeat of %s posted again\n", now(), node)
			failing = false
		case err == nil && !failing:
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(interval):
		}
	}
}

func now() string { return time.Now().Format(time.RFC3339) }

// beat creates the Node if needed and posts Ready=True.
func beat(ctx context.Context, cs kubernetes.Interface, node, address string) error {
	c, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	_, err := cs.CoreV1().Nodes().Get(c, node, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: node, Labels: map[string]string{
			"kubernetes.io/hostname": node, "kubernetes.io/os": "linux", LabelLocalCluster: "true",
		}}}
		if _, err := cs.CoreV1().Nodes().Create(c, n, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("create Node: %w", err)
		}
		fmt.Fprintf(os.Stderr, "%s created Node %s\n", now(), node)
	} else if err != nil {
		return err
	}
	return retry.RetryOnConflict(retry.DefaultRetry, func() error {
		n, err := cs.CoreV1().Nodes().Get(c, node, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if address != "" {
			n.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: address}, {Type: corev1.NodeHostName, Address: node}}
		}
		n.Status.NodeInfo.KubeletVersion = "tandem-nodesim"
		n.Status.NodeInfo.OperatingSystem = "linux"
		setCondition(n, corev1.ConditionTrue, "KubeletReady", "tandem nodesim is posting ready status")
		_, err = cs.CoreV1().Nodes().UpdateStatus(c, n, metav1.UpdateOptions{})
		return err
	})
}

// setCondition sets Ready, keeping lastTransitionTime when the status holds.
func setCondition(n *corev1.Node, status corev1.ConditionStatus, reason, msg string) {
	t := metav1.Now()
	for i := range n.Status.Conditions {
		c := &n.Status.Conditions[i]
		if c.Type != corev1.NodeReady {
			continue
		}
		if c.Status != status {
			c.LastTransitionTime = t
		}
		c.Status, c.Reason, c.Message = status, reason, msg
		if status == corev1.ConditionTrue {
			c.LastHeartbeatTime = t
		}
		return
	}
	n.Status.Conditions = append(n.Status.Conditions, corev1.NodeCondition{
		Type: corev1.NodeReady, Status: status, Reason: reason, Message: msg, LastHeartbeatTime: t, LastTransitionTime: t,
	})
}

func setReady(ctx context.Context, cs kubernetes.Interface, node string, status corev1.ConditionStatus, reason, msg string) error {
	c, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	return retry.RetryOnConflict(retry.DefaultRetry, func() error {
		n, err := cs.CoreV1().Nodes().Get(c, node, metav1.GetOptions{})
		if err != nil {
			return err
		}
		setCondition(n, status, reason, msg)
		_, err = cs.CoreV1().Nodes().UpdateStatus(c, n, metav1.UpdateOptions{})
		return err
	})
}

// lifecycle marks Nodes Unknown when their heartbeat is older than grace,
// as the node-lifecycle controller does (without its taints and evictions).
func lifecycle(ctx context.Context, cs kubernetes.Interface, interval, grace time.Duration) error {
	for {
		c, cancel := context.WithTimeout(ctx, 5*time.Second)
		list, err := cs.CoreV1().Nodes().List(c, metav1.ListOptions{LabelSelector: LabelLocalCluster + "=true"})
		cancel()
		if err != nil && ctx.Err() == nil {
			fmt.Fprintf(os.Stderr, "%s list Nodes: %v\n", now(), err)
		}
		if list != nil {
			for _, n := range list.Items {
				for _, cond := range n.Status.Conditions {
					if cond.Type == corev1.NodeReady && cond.Status == corev1.ConditionTrue && time.Since(cond.LastHeartbeatTime.Time) > grace {
						err := setReady(ctx, cs, n.Name, corev1.ConditionUnknown, "NodeStatusUnknown", "Kubelet stopped posting node status.")
						fmt.Fprintf(os.Stderr, "%s Node %s: no heartbeat for %v, marked Ready=Unknown (err=%v)\n", now(), n.Name, time.Since(cond.LastHeartbeatTime.Time).Round(time.Second), err)
					}
				}
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(interval):
		}
	}
}
