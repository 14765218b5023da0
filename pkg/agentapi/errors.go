package agentapi

import (
	"errors"
	"fmt"
	"net/http"
)

// APIError is an answer other than 2xx, with the message of its ErrorBody.
type APIError struct {
	Code    int
	Message string
}

func (e *APIError) Error() string { return fmt.Sprintf("agent answered %d: %s", e.Code, e.Message) }

// IsNotFound reports whether err is the agent's 404: the agent answered and
// has no replica of that volume (or no such endpoint). The controller reads
// it as "reachable, no replica yet" when probing and as "already gone" when
// deleting.
func IsNotFound(err error) bool {
	var e *APIError
	return errors.As(err, &e) && e.Code == http.StatusNotFound
}

// ErrNotSent is wrapped by the error of a call that never reached the
// agent: no connection to it was made (the dial failed or timed out, or the
// context ended first), so the agent did not act on it. A call that failed
// in any other way (after connecting: a write error, a timeout, a lost
// answer) may have taken effect. Client relies on the transport reporting
// connections through net/http/httptrace, as net/http's does.
var ErrNotSent = errors.New("request not sent: no connection to the agent was made")
