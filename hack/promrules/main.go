// Command promrules writes Prometheus rules files for `promtool check rules`
// (make lint-rules):
//
//	promrules < manifests            the spec of the PrometheusRule objects in
//	                                 rendered manifests (helm template); fails
//	                                 when there is none, so a chart that stops
//	                                 rendering one does not pass unchecked
//	promrules -dashboard FILE.json   one recording rule per query of a Grafana
//	                                 dashboard, its variables replaced by
//	                                 values, so promtool parses every query
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

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
	dashboard := flag.String("dashboard", "", "Grafana dashboard JSON: write its queries as recording rules instead")
	flag.Parse()
	if *dashboard != "" {
		if err := dashboardRules(*dashboard, os.Stdout); err != nil {
			fmt.Fprintln(os.Stderr, "promrules:", err)
			os.Exit(1)
		}
		return
	}
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

// grafanaVars stand in for the variables the dashboard's queries use.
var grafanaVars = strings.NewReplacer(
	"$__rate_interval", "1m", "$__interval", "1m", "$__range", "1h",
	"${volume}", ".*", "$volume", ".*", "${instance}", ".*", "$instance", ".*",
)

func dashboardRules(path string, out io.Writer) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var d any
	if err := json.Unmarshal(b, &d); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	var rules []map[string]string
	var walk func(v any)
	walk = func(v any) {
		switch v := v.(type) {
		case map[string]any:
			for k, x := range v {
				if s, ok := x.(string); ok && k == "expr" {
					e := grafanaVars.Replace(s)
					if strings.Contains(e, "$") {
						// A variable this command does not know: promtool
						// would report a confusing parse error.
						rules = append(rules, map[string]string{"record": "dashboard:unknown_variable", "expr": "unknown variable in: " + s})
						continue
					}
					rules = append(rules, map[string]string{"record": fmt.Sprintf("dashboard:query_%d", len(rules)+1), "expr": e})
					continue
				}
				walk(x)
			}
		case []any:
			for _, x := range v {
				walk(x)
			}
		}
	}
	walk(d)
	if len(rules) == 0 {
		return fmt.Errorf("%s holds no query", path)
	}
	y, err := yaml.Marshal(map[string]any{"groups": []any{map[string]any{"name": "dashboard", "rules": rules}}})
	if err != nil {
		return err
	}
	_, err = out.Write(y)
	return err
}
