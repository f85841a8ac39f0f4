-- hiveseed: whether init-age.sql has anything left to do on {{ node.name }} (region {{ region.name }}):
-- cmd:sql-init's `unless`, run by psql as postgres over the local socket with ON_ERROR_STOP. In
-- every ai_memory database: both extensions, the graph owned by ai_memory, the peers' schemas.
-- A missing database fails its \connect, anything else missing divides by zero; either way psql
-- stops non-zero and init-age.sql runs.
{%- for db in region.databases %}

\connect {{ db.name }}
SELECT 1 / (
  (SELECT count(*) FROM pg_extension WHERE extname IN ('age', 'vector')) = 2
  AND (SELECT count(*) FROM ag_catalog.ag_graph WHERE name = 'memory_graph') = 1
  AND (SELECT count(*) FROM pg_namespace WHERE nspname = 'memory_graph' AND nspowner = 'ai_memory'::regrole) = 1
  {%- if db.schemas %}
  AND (SELECT count(*) FROM pg_namespace WHERE nspname = ANY ('{{ '{' }}{{ db.schemas | join(',') }}{{ '}' }}'::text[])) = {{ db.schemas | length }}
  {%- endif %}
)::int;
{%- endfor %}
