// Command agent is Tandem's per-node dataplane agent: it stores replicas,
// serves the active primary over NBD, mirrors writes to the peer and answers
// the controller's control API. The dataplane is built in issue #3; until it
// lands this binary refuses to start so nobody mistakes it for a working agent.
package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Fprintln(os.Stderr, "tandem agent: the dataplane is not implemented yet (issue #3); refusing to start")
	os.Exit(2)
}
