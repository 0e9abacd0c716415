# goutube's built-in authorization policy, evaluated by the host with oso for the default
# authorizer (builtin:polar-authorizer). A rule is allow(subject, action, point):
#   subject  the common name of the client certificate ("anonymous" on a plaintext listener)
#   action   "produce", "consume", "metadata", "replicate" or "admin"
#   point    the point id ("" for calls that name no point, a prefix for listings)
# Anything no rule allows is denied.

# root may do everything.
allow("root", _action, _point);

# Node certificates (common name "node:<name>", as `goutube certs` makes them) may replicate.
allow(subject: String, "replicate", _point) if subject.starts_with("node:");

# A node without TLS cannot tell clients apart: they all arrive as "anonymous". This rule lets
# such a development node work out of the box. With TLS configured no connection is anonymous
# (a certificate naming itself "anonymous" is refused), so the rule never applies there.
allow("anonymous", _action, _point);
