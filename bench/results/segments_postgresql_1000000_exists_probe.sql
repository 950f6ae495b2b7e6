-- Experiment at 1,000,000 contacts (docs/performance.md, Segments): mammography_gap with EXISTS instead of IN,
-- on the vacuumed population of segments_postgresql_1000000.json (load average 9.2), after
--   CREATE INDEX ix_exp_recipients_contact ON message_recipients (contact_id, status, message_id, org_id); ANALYZE message_recipients;
-- (an experiment: the index is not in the models). Execution times of four runs: 2371, 2533, 2362, 2115 ms;
-- count 44,141 as the compiled and hand-written IN forms. Only the SNOMED mammography codes are listed: the
-- CPT and LOINC codes of the value set have no rows in the generated population.
EXPLAIN (ANALYZE, BUFFERS)
SELECT count(*) FROM contacts c
WHERE c.org_id = '01a23e0f4c7e484a1a54b36cabce2896' AND c.deceased IS NOT TRUE AND c.sex = 'female'
  AND c.birth_date > '1951-12-03' AND c.birth_date <= '1976-12-03'
  AND c.id NOT IN (SELECT p.contact_id FROM procedures p WHERE p.org_id = '01a23e0f4c7e484a1a54b36cabce2896' AND p.code_verified
                   AND p.code_system = 'snomed' AND p.code IN ('71651007', '24623002')
                   AND p.performed_start >= '2024-12-03 23:00+00' AND p.performed_start <= '2026-12-03 23:00+00')
  AND EXISTS (SELECT 1 FROM message_recipients r JOIN messages m ON m.id = r.message_id
              WHERE r.contact_id = c.id AND r.org_id = '01a23e0f4c7e484a1a54b36cabce2896' AND r.status IN ('delivered', 'portal_viewed')
                AND m.org_id = '01a23e0f4c7e484a1a54b36cabce2896' AND NOT m.sandbox
                AND m.created_at >= '2025-12-03 23:00+00' AND m.created_at <= '2026-12-03 23:00+00');
