// Command promrules reads rendered Kubernetes manifests (helm template) on
// stdin and writes the spec of their PrometheusRule objects to stdout as a
// Prometheus rules file, for `promtool check rules` (make lint-rules). It
// fails when the input holds no PrometheusRule, so a chart that stops
// rendering one does not pass unchecked.
package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"

	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

type object struct {
	Kind     string `json:"kind"`
	Metadata struct {
		Name string `json:"name"`
	} `json:"metadata"`
	Spec struct {
		Groups []any `json:"groups"`
	} `json:"spec"`
}

func main() {
	if err := run(os.Stdin, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "promrules:", err)
		os.Exit(1)
	}
}

func run(in io.Reader, out io.Writer) error {
	dec := utilyaml.NewYAMLOrJSONDecoder(bufio.NewReader(in), 4096)
	var groups []any
	rules := 0
	for {
		var o object
		err := dec.Decode(&o)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return err
		}
		if o.Kind != "PrometheusRule" {
			continue
		}
		rules++
		if len(o.Spec.Groups) == 0 {
			return fmt.Errorf("PrometheusRule %s has no groups", o.Metadata.Name)
		}
		groups = append(groups, o.Spec.Groups...)
	}
	if rules == 0 {
		return errors.New("no PrometheusRule in the input")
	}
	b, err := yaml.Marshal(map[string]any{"groups": groups})
	if err != nil {
		return err
	}
	_, err = out.Write(b)
	return err
}
